"""Wrapped variables survive msgpack and orbax unchanged; LoRA adapters save on their own."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization

from wrapkit.linen import (
    FakeQuant,
    LoRA,
    SpectralNorm,
    WeightNorm,
    WeightStandardization,
    adapter_params,
    merge_params,
    param_labels,
)

PARTITIONED = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
WRAPPERS = {
    "weight_norm": WeightNorm,
    "spectral_norm": SpectralNorm,
    "lora": functools.partial(LoRA, rank=2, b_init=nn.initializers.normal(1.0)),
    "weight_standardization": WeightStandardization,
    "fake_quant": functools.partial(FakeQuant, bits=4),
}


class _Model(nn.Module):
    wrapper: str
    partitioned: bool

    @nn.compact
    def __call__(self, x):
        init = PARTITIONED if self.partitioned else nn.initializers.lecun_normal()
        wrap = WRAPPERS[self.wrapper]
        kwargs = {"update_stats": True} if self.wrapper == "spectral_norm" else {}
        x = wrap(nn.Dense(6, kernel_init=init))(x, **kwargs)
        return wrap(nn.Dense(3, kernel_init=init))(nn.tanh(x), **kwargs)


def _setup(wrapper, partitioned):
    model = _Model(wrapper, partitioned)
    x = jax.random.normal(jax.random.key(1), (4, 5))
    variables = model.init(jax.random.key(0), x)
    if wrapper == "spectral_norm":
        _, updates = model.apply(variables, x, mutable=["batch_stats"])
        variables = {**variables, **updates}
    return model, x, variables


def _outputs(model, variables, x):
    return model.apply(variables, x, mutable=["batch_stats"])[0]


CASES = [
    pytest.param(w, p, id=f"{w}-{'partitioned' if p else 'plain'}")
    for w in WRAPPERS
    for p in (False, True)
]


@pytest.mark.parametrize(("wrapper", "partitioned"), CASES)
def test_msgpack_restores_every_variable_into_an_abstract_target(wrapper, partitioned):
    model, x, variables = _setup(wrapper, partitioned)
    target = jax.eval_shape(model.init, jax.random.key(0), x)
    restored = serialization.from_bytes(target, serialization.to_bytes(variables))
    chex.assert_trees_all_equal(restored, variables)
    np.testing.assert_array_equal(_outputs(model, restored, x), _outputs(model, variables, x))


@pytest.mark.parametrize(("wrapper", "partitioned"), CASES)
def test_orbax_restores_every_variable_into_an_abstract_target(wrapper, partitioned, tmp_path):
    model, x, variables = _setup(wrapper, partitioned)
    target = jax.eval_shape(model.init, jax.random.key(0), x)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", variables)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "ckpt", target)
    chex.assert_trees_all_equal(restored, variables)
    if partitioned:
        assert nn.get_partition_spec(restored) == nn.get_partition_spec(variables)
    np.testing.assert_array_equal(_outputs(model, restored, x), _outputs(model, variables, x))


def test_a_lora_adapter_saves_and_loads_on_its_own(tmp_path):
    model, x, variables = _setup("lora", partitioned=False)
    params = variables["params"]
    labels = param_labels(model, x)
    adapter = adapter_params(params, labels)
    assert sorted(adapter) == ["LoRA_0", "LoRA_1"]
    saved = sum(v.size for v in jax.tree_util.tree_leaves(adapter))
    assert saved == 5 * 2 + 2 * 6 + 6 * 2 + 2 * 3
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "adapter", adapter)
        checkpointer.wait_until_finished()
        loaded = checkpointer.restore(tmp_path / "adapter", jax.eval_shape(lambda: adapter))
    # A fresh model (other base initialisation) with the trained base and the loaded adapter.
    fresh = model.init(jax.random.key(7), x)["params"]
    fresh = merge_params(fresh, {"Dense_0": params["Dense_0"], "Dense_1": params["Dense_1"]})
    merged = merge_params(fresh, loaded)
    chex.assert_trees_all_equal(merged, params)


def test_merging_an_adapter_of_another_rank_or_model_is_refused():
    model, x, variables = _setup("lora", partitioned=False)
    params = variables["params"]
    other = LoRA(nn.Dense(6), rank=3)
    with pytest.raises(ValueError, match=r"'LoRA_0/Dense_0/kernel/lora_a' has shape \(5, 3\)"):
        merge_params(params, {"LoRA_0": {"Dense_0/kernel/lora_a": jnp.zeros((5, 3))}})
    wrong = adapter_params(other.init(jax.random.key(0), x)["params"], param_labels(other, x))
    with pytest.raises(ValueError, match=r"'layer_instance/kernel/lora_a' is not a parameter"):
        merge_params(params, wrong)
