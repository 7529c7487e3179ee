"""Training a wrapped model: parameter labels for optax, and what they freeze."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import wrapkit
from wrapkit.linen import LoRA, WeightNorm, label_counts, param_labels, train_labels


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = LoRA(nn.Dense(8), rank=2)(x)
        x = WeightNorm(nn.Dense(8))(nn.relu(x))
        x = nn.LayerNorm()(x)
        return LoRA(nn.Dense(3), rank=2, freeze_base=False)(x)


X = jax.ShapeDtypeStruct((4, 5), jnp.float32)


def test_labels_name_adapters_wrapper_params_frozen_and_base_weights():
    labels = traverse_util.flatten_dict(param_labels(_Net(), X), sep="/")
    assert labels == {
        "Dense_0/kernel": "frozen",
        "Dense_0/bias": "base",
        "LoRA_0/Dense_0/kernel/lora_a": "adapter",
        "LoRA_0/Dense_0/kernel/lora_b": "adapter",
        "Dense_1/kernel": "base",
        "Dense_1/bias": "base",
        "WeightNorm_0/Dense_1/kernel/scale": "wrapper",
        "LayerNorm_0/scale": "base",
        "LayerNorm_0/bias": "base",
        # freeze_base=False: the kernel trains with its adapter.
        "Dense_2/kernel": "base",
        "Dense_2/bias": "base",
        "LoRA_1/Dense_2/kernel/lora_a": "adapter",
        "LoRA_1/Dense_2/kernel/lora_b": "adapter",
    }


def test_labels_reach_layers_stacked_by_nn_scan():
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return LoRA(nn.Dense(5), rank=1)(x), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scanned = nn.scan(
                Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
            )
            return scanned(name="layers")(x, None)[0]

    labels = traverse_util.flatten_dict(param_labels(Stack(), X), sep="/")
    assert labels == {
        "layers/Dense_0/kernel": "frozen",
        "layers/Dense_0/bias": "base",
        "layers/LoRA_0/Dense_0/kernel/lora_a": "adapter",
        "layers/LoRA_0/Dense_0/kernel/lora_b": "adapter",
    }


def test_training_only_the_adapters_leaves_every_other_parameter_bit_identical():
    model = _Net()
    x = jax.random.normal(jax.random.key(1), (16, 5))
    target = jax.random.normal(jax.random.key(2), (16, 3))
    params = model.init(jax.random.key(0), x)["params"]
    tx = optax.multi_transform(
        {"train": optax.adam(1e-2), "freeze": optax.set_to_zero()},
        train_labels(param_labels(model, x)),
    )
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean((model.apply({"params": p}, x) - target) ** 2)
        )(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    trained = params
    for _ in range(20):
        trained, state, loss = step(trained, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    labels = traverse_util.flatten_dict(param_labels(model, x))
    before, after = traverse_util.flatten_dict(params), traverse_util.flatten_dict(trained)
    for path, kind in labels.items():
        if kind == "adapter":
            assert not np.array_equal(before[path], after[path]), path
        else:
            np.testing.assert_array_equal(before[path], after[path], err_msg=str(path))


def test_train_labels_take_any_kinds_and_refuse_unknown_ones():
    labels = {"a": "adapter", "s": "wrapper", "w": "base"}
    assert train_labels(labels, ("adapter", "wrapper")) == {
        "a": "train",
        "s": "train",
        "w": "freeze",
    }
    assert train_labels(labels, "base") == {"a": "freeze", "s": "freeze", "w": "train"}
    with pytest.raises(ValueError, match=r"unknown kinds \['adapters'\]; the kinds are"):
        train_labels(labels, "adapters")


def test_label_counts_per_summary_row_split_adapters_from_frozen_weights():
    model = _Net()
    summary = wrapkit.summary(model, X)
    params = jax.eval_shape(model.init, jax.random.key(0), X)["params"]
    labels = param_labels(model, X)
    rows = {row.path: row for row in summary.rows}
    lora, dense = rows[("LoRA_0",)], rows[("Dense_0",)]
    assert {k: s.count for k, s in label_counts(labels, params, lora.path).items()} == {
        "adapter": 5 * 2 + 2 * 8
    }
    assert {k: s.count for k, s in label_counts(labels, params, dense.path).items()} == {
        "base": 8,
        "frozen": 5 * 8,
    }
    whole = label_counts(labels, params)
    assert sum(s.count for s in whole.values()) == summary.variables["params"].count
