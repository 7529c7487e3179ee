"""Checkpoints, serialisation and copies of models holding wrapkit.nnx wrappers.

A wrapper's own variables (WeightNorm's scales, a wrapper's statistics) are ordinary NNX
Variables in the model's state, so every way NNX saves, restores and copies a model's state
carries them: an orbax checkpoint restored into a model built with ``nnx.eval_shape``,
``flax.serialization``'s state dicts and msgpack bytes, ``nnx.to_pure_dict`` and
``nnx.replace_by_pure_dict``, ``copy.deepcopy``, ``nnx.clone`` and ``pickle``. Restored and
copied models run the same program on the same values as the original, so their outputs
are compared exactly.
"""

from __future__ import annotations

import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx, serialization

from wrapkit.nnx import LoRA, SpectralNorm, WeightNorm, Wrapper

X = jax.random.normal(jax.random.key(7), (8, 3))


class Counted(Wrapper):
    """Doubles each kernel and counts its calls in a BatchStat of its own."""

    default_filter = ("kernel",)

    def create(self, leaf, rngs):
        return {"calls": nnx.BatchStat(jnp.zeros((), jnp.int32))}

    def transform(self, leaf):
        calls = self.own("calls", leaf)
        calls[...] = calls[...] + 1
        return 2 * leaf.value


def adapter_init(key, shape, dtype):
    """LoRA's ``a_init``, a module-level function: the wrappers keep their initialisers
    as attributes, and pickle takes a function by its name (LoRA's default initialiser, made
    by ``nnx.initializers.variance_scaling``, is a closure, which pickle refuses)."""
    return 0.5 * jax.random.normal(key, shape, dtype)


class Net(nnx.Module):
    """Every kind of own variable: WeightNorm's scales (Params), SpectralNorm's statistics
    (BatchStats it updates), LoRA's factors (LoRAParams), a stacked wrapper's count; in an
    nnx.List, next to a BatchNorm."""

    def __init__(self, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.layers = nnx.List(
            [
                WeightNorm(nnx.Linear(3, 8, rngs=rngs)),
                SpectralNorm(nnx.Linear(8, 8, rngs=rngs), rngs=rngs),
            ]
        )
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.adapted = LoRA(nnx.Linear(8, 8, rngs=rngs), rank=2, a_init=adapter_init, rngs=rngs)
        self.head = Counted(WeightNorm(nnx.Linear(8, 2, rngs=rngs), feature_axes=None))

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.head(jnp.tanh(self.adapted(self.bn(x))))


def trained(seed: int = 0) -> Net:
    """A Net after two SGD steps: no variable holds its initial value any more."""
    model = Net(seed)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        grads = nnx.grad(lambda m: jnp.mean(m(X) ** 2))(model)
        optimizer.update(model, grads)

    for _ in range(2):
        step(model, optimizer)
    return model


def values(module):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module)))


def assert_same_state(a, b):
    jax.tree.map(np.testing.assert_array_equal, values(a), values(b))


def assert_same_model(a, b):
    """Equal states, and equal outputs and updated statistics in training and evaluation."""
    assert_same_state(a, b)
    a.eval(), b.eval()
    np.testing.assert_array_equal(a(X), b(X))
    a.train(), b.train()
    np.testing.assert_array_equal(a(X), b(X))
    assert_same_state(a, b)


def test_the_model_trained_and_every_own_variable_changed():
    model, fresh = trained(), Net()
    own = {
        "scale": (model.layers[0].scale["kernel"], fresh.layers[0].scale["kernel"]),
        "u": (model.layers[1].u["kernel"], fresh.layers[1].u["kernel"]),
        "sigma": (model.layers[1].sigma["kernel"], fresh.layers[1].sigma["kernel"]),
        "lora_b": (model.adapted.lora_b["kernel"], fresh.adapted.lora_b["kernel"]),
        "calls": (model.head.calls["kernel"], fresh.head.calls["kernel"]),
    }
    for name, (after, before) in own.items():
        assert not np.array_equal(after[...], before[...]), name
    assert int(model.head.calls["kernel"][...]) == 2


# --- orbax -------------------------------------------------------------------------------


@pytest.mark.parametrize("restore", ["nnx.update", "nnx.merge"])
def test_an_abstract_model_restores_from_an_orbax_checkpoint_of_the_real_one(tmp_path, restore):
    real = trained()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "state", nnx.state(real))
    checkpointer.wait_until_finished()

    abstract = nnx.eval_shape(lambda: Net(seed=3))
    scale = abstract.layers[0].scale["kernel"]
    assert isinstance(scale, nnx.Param) and isinstance(scale.get_value(), jax.ShapeDtypeStruct)
    restored_state = checkpointer.restore(tmp_path / "state", nnx.state(abstract))
    if restore == "nnx.update":
        nnx.update(abstract, restored_state)
        restored = abstract
    else:
        restored = nnx.merge(nnx.graphdef(abstract), restored_state)
    assert_same_model(restored, real)


# --- flax.serialization and pure dicts ---------------------------------------------------


def test_the_state_round_trips_through_flax_serialization_state_dicts_and_msgpack():
    real = trained()
    pure = nnx.to_pure_dict(nnx.state(real))
    state_dict = serialization.to_state_dict(pure)
    assert state_dict["layers"]["0"]["scale"]["kernel"].shape == (8,)  # keys made strings
    data = serialization.to_bytes(pure)
    saved = nnx.clone(real)  # the model as saved (a training-mode call updates statistics)
    for restore in (
        lambda target: serialization.from_state_dict(target, state_dict),
        lambda target: serialization.from_bytes(target, data),
    ):
        other = Net(seed=5)
        state = nnx.state(other)
        loaded = restore(nnx.to_pure_dict(state))
        # msgpack gives read-only numpy arrays; BatchNorm writes its statistics in place.
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, loaded))
        nnx.update(other, state)
        assert_same_model(other, nnx.clone(saved))


def test_the_state_round_trips_through_pure_dicts():
    real = trained()
    pure = nnx.to_pure_dict(nnx.state(real))
    assert set(pure["head"]) == {"layer_instance", "calls"}
    assert set(pure["head"]["layer_instance"]) == {"layer_instance", "scale"}
    other = Net(seed=5)
    state = nnx.state(other)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(other, state)
    assert_same_model(other, real)


# --- copies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "duplicate",
    [copy.deepcopy, nnx.clone, lambda model: pickle.loads(pickle.dumps(model))],
    ids=["copy.deepcopy", "nnx.clone", "pickle"],
)
def test_copies_of_a_wrapped_model_are_equal_and_independent(duplicate):
    real = trained()
    twin = duplicate(real)
    assert type(twin.head) is Counted and twin.head.layer_instance is not real.head.layer_instance
    assert_same_model(twin, real)
    kernel = twin.layers[0].layer_instance.kernel
    kernel[...] = kernel[...] + 1
    assert not np.array_equal(kernel[...], real.layers[0].layer_instance.kernel[...])


# --- flax failures this fixes ------------------------------------------------------------


def test_flax_5577_weight_norm_scales_are_in_eval_shapes_state_and_get_gradients():
    """flax issue 5577: nnx.WeightNorm keeps its scales as a plain dict of arrays, made on
    the first call, so nnx.eval_shape's model has none to restore a checkpoint into and
    nnx.grad gives them no gradient. wrapkit's scales are nnx.Params, made when the wrapper
    is built."""

    def flax_model():
        return nnx.WeightNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))

    def ours():
        return WeightNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))

    x = X[:2]
    # flax 0.12.8 (when these two lines fail, flax has fixed the issue: drop them).
    assert set(nnx.to_pure_dict(nnx.state(nnx.eval_shape(flax_model)))) == {"layer_instance"}
    assert set(nnx.to_pure_dict(nnx.grad(lambda m: m(x).sum())(flax_model()))) == {"layer_instance"}

    abstract = nnx.eval_shape(ours)
    shape = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))["scale"]["kernel"]
    assert shape == jax.ShapeDtypeStruct((4,), jnp.float32)
    model = ours()
    grads = nnx.to_pure_dict(nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model))
    assert grads["scale"]["kernel"].shape == (4,)
    assert float(jnp.abs(grads["scale"]["kernel"]).min()) > 0

    def by_hand(kernel, scale):
        w = kernel / jnp.sqrt(jnp.sum(kernel**2, axis=0) + 1e-12) * scale
        return jnp.sum((x @ w + model.layer_instance.bias[...]) ** 2)

    expected = jax.grad(by_hand, argnums=1)(
        model.layer_instance.kernel[...], model.scale["kernel"][...]
    )
    np.testing.assert_allclose(grads["scale"]["kernel"], expected, rtol=1e-5, atol=1e-6)
