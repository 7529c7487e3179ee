"""wrapkit.nnx.LoRA: outputs against numpy, flax's nnx.LoRA and the Linen twin; training
only the adapters; the unmerged form's cost; dropout; errors."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import wrapkit
import wrapkit.linen
from wrapkit._unmerged import UnmergedError
from wrapkit.nnx import LoRA, WeightNorm

JIT = [pytest.param(lambda f: f, id="eager"), pytest.param(nnx.jit, id="jit")]
RANDOM_B = nnx.initializers.normal(1.0)


def _normal(i: int, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(jax.random.key(i), shape, dtype)


def _f64(value) -> np.ndarray:
    return np.asarray(value, np.float64)


def _delta(model: LoRA, path: str, input_axes, output_axes) -> np.ndarray:
    """``s * A @ B`` laid out with the weight's axes in their places (numpy, float64)."""
    a, b = _f64(model.lora_a[path][...]), _f64(model.lora_b[path][...])
    rank = a.shape[-1]
    full = (a.reshape(-1, rank) @ b.reshape(rank, -1)).reshape(a.shape[:-1] + b.shape[1:])
    order = list(input_axes) + list(output_axes)
    return model.scale * np.transpose(full, [order.index(axis) for axis in range(len(order))])


def _np_conv(x: np.ndarray, w: np.ndarray, padding: int) -> np.ndarray:
    x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    kh, kw = w.shape[:2]
    out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    y = np.zeros((x.shape[0], out_h, out_w, w.shape[-1]))
    for i in range(out_h):
        for j in range(out_w):
            y[:, i, j] = np.einsum("nhwc,hwco->no", x[:, i : i + kh, j : j + kw, :], w)
    return y


def _raw(module: nnx.Module) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module)))


# -- outputs against an independent numpy computation --------------------------------------

CASES = {
    "linear": (
        lambda rngs: nnx.Linear(6, 5, rngs=rngs),
        {},
        (4, 6),
        ((0,), (1,)),
        lambda x, w, layer: x @ w + _f64(layer.bias[...]),
    ),
    "conv": (
        lambda rngs: nnx.Conv(3, 4, (3, 3), padding=1, rngs=rngs),
        {},
        (2, 5, 5, 3),
        ((0, 1, 2), (3,)),
        lambda x, w, layer: _np_conv(x, w, 1) + _f64(layer.bias[...]),
    ),
    "einsum": (
        lambda rngs: nnx.Einsum("btd,dnh->btnh", (5, 2, 3), (2, 3), rngs=rngs),
        {"feature_axes": (1, 2)},
        (2, 3, 5),
        ((0,), (1, 2)),
        lambda x, w, layer: np.einsum("btd,dnh->btnh", x, w) + _f64(layer.bias[...]),
    ),
    # The use batches over the expert axis: each expert's slice takes its rows of A.
    "einsum_experts": (
        lambda rngs: nnx.Einsum("ebd,edh->ebh", (3, 5, 4), rngs=rngs),
        {},
        (3, 2, 5),
        ((0, 1), (2,)),
        lambda x, w, layer: np.einsum("ebd,edh->ebh", x, w),
    ),
}


@pytest.mark.parametrize("jit", JIT)
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_outputs_equal_numpy_on_the_merged_weight(case, jit):
    build, options, shape, (input_axes, output_axes), forward = CASES[case]
    model = LoRA(
        build(nnx.Rngs(0)), rank=2, alpha=3.0, b_init=RANDOM_B, rngs=nnx.Rngs(1), **options
    )
    kernel = model.layer_instance.kernel[...]
    a, b = model.lora_a["kernel"], model.lora_b["kernel"]
    assert a.shape == (*(kernel.shape[i] for i in input_axes), 2)
    assert b.shape == (2, *(kernel.shape[i] for i in output_axes))
    weight = _f64(kernel) + _delta(model, "kernel", input_axes, output_axes)
    x = _normal(2, shape)
    expected = forward(_f64(x), weight, model.layer_instance)
    y = jit(lambda model, x: model(x))(model, x)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("jit", JIT)
def test_a_tied_embedding_takes_one_delta_in_lookup_and_attend(jit):
    model = LoRA(
        nnx.Embed(11, 6, rngs=nnx.Rngs(0)),
        rank=3,
        b_init=RANDOM_B,
        delegates=("__call__", "attend"),
        rngs=nnx.Rngs(1),
    )
    assert model.lora_a["embedding"].shape == (11, 3)
    assert model.lora_b["embedding"].shape == (3, 6)
    table = _f64(model.layer_instance.embedding[...]) + _delta(model, "embedding", (0,), (1,))
    ids = jnp.array([[0, 3, 10], [7, 7, 1]])
    rows = jit(lambda model, ids: model(ids))(model, ids)
    np.testing.assert_allclose(np.asarray(rows), table[np.asarray(ids)], rtol=1e-5, atol=1e-5)
    query = _normal(2, (4, 6))
    logits = jit(lambda model, q: model.attend(q))(model, query)
    np.testing.assert_allclose(np.asarray(logits), _f64(query) @ table.T, rtol=1e-5, atol=1e-5)


def test_every_kernel_of_a_sequential_takes_its_own_delta():
    first, second = nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1))
    model = LoRA(nnx.Sequential(first, jnp.tanh, second), rank=2, b_init=RANDOM_B, rngs=nnx.Rngs(2))
    assert sorted(model.lora_a) == ["layers/0/kernel", "layers/2/kernel"]
    x = _normal(3, (5, 3))
    w0 = _f64(first.kernel[...]) + _delta(model, "layers/0/kernel", (0,), (1,))
    w1 = _f64(second.kernel[...]) + _delta(model, "layers/2/kernel", (0,), (1,))
    h = np.tanh(_f64(x) @ w0 + _f64(first.bias[...]))
    np.testing.assert_allclose(model(x), h @ w1 + _f64(second.bias[...]), rtol=1e-5, atol=1e-5)


def test_stacked_outside_weight_norm():
    layer = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    model = LoRA(WeightNorm(layer), rank=2, b_init=RANDOM_B, rngs=nnx.Rngs(1))
    v = _f64(layer.kernel[...])
    normalised = v / np.linalg.norm(v, axis=0) * _f64(model.layer_instance.scale["kernel"][...])
    x = _normal(2, (2, 3))
    expected = _f64(x) @ (normalised + _delta(model, "kernel", (0,), (1,))) + _f64(layer.bias[...])
    np.testing.assert_allclose(model(x), expected, rtol=1e-5, atol=1e-5)


# -- against flax's nnx.LoRA and the Linen twin ---------------------------------------------


def test_equals_flax_nnx_lora_given_its_factors():
    rank = 3
    flax_lora = nnx.LoRA(
        6, rank, 4, base_module=nnx.Linear(6, 4, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1)
    )
    flax_lora.lora_b[...] = _normal(2, (rank, 4))  # flax's B starts at zero too
    ours = LoRA(nnx.Linear(6, 4, rngs=nnx.Rngs(0)), rank=rank, alpha=rank, rngs=nnx.Rngs(3))
    ours.lora_a["kernel"][...] = flax_lora.lora_a[...]
    ours.lora_b["kernel"][...] = flax_lora.lora_b[...]
    x = _normal(4, (5, 6))
    np.testing.assert_allclose(ours(x), flax_lora(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_equals_the_linen_lora_given_the_same_variables(rslora):
    model = LoRA(
        nnx.Linear(6, 4, rngs=nnx.Rngs(0)),
        rank=2,
        alpha=5.0,
        rslora=rslora,
        b_init=RANDOM_B,
        rngs=nnx.Rngs(1),
    )
    linen = wrapkit.linen.LoRA(nn.Dense(4), rank=2, alpha=5.0, rslora=rslora)
    layer = model.layer_instance
    variables = {
        "params": {
            "layer_instance": {"kernel": layer.kernel[...], "bias": layer.bias[...]},
            "layer_instance/kernel/lora_a": model.lora_a["kernel"][...],
            "layer_instance/kernel/lora_b": model.lora_b["kernel"][...],
        }
    }
    x = _normal(2, (3, 6))
    # The same tree of shapes as Linen makes for itself.
    chex.assert_trees_all_equal_shapes(variables, linen.init(jax.random.key(0), x))
    assert model.scale == linen.scale
    np.testing.assert_allclose(model(x), linen.apply(variables, x), rtol=1e-6, atol=1e-6)


def test_outputs_start_unchanged_and_the_default_a_init_is_linens():
    layer = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    x = _normal(1, (3, 8))
    plain = layer(x)
    model = LoRA(layer, rank=4, rngs=nnx.Rngs(1))
    assert not np.any(np.asarray(model.lora_b["kernel"][...]))
    np.testing.assert_allclose(model(x), plain, rtol=1e-6, atol=1e-6)
    # Uniform in ±1/sqrt(fan_in), fan_in = 8: its bounds, and a spread over them.
    a = np.asarray(model.lora_a["kernel"][...])
    assert np.all(np.abs(a) <= 1 / np.sqrt(8)) and np.ptp(a) > 0.5 / np.sqrt(8)
    assert LoRA(layer, rank=4, alpha=16.0, rngs=nnx.Rngs(1)).scale == 4.0
    assert LoRA(layer, rank=4, alpha=16.0, rslora=True, rngs=nnx.Rngs(1)).scale == 8.0


# -- training only the adapters -------------------------------------------------------------


def _loss(model, x):
    return jnp.sum(jnp.tanh(model(x)))


def test_an_optimizer_on_lora_params_changes_only_the_factors():
    model = LoRA(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rank=2, b_init=RANDOM_B, rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)
    before = _raw(model)
    x = _normal(2, (5, 4))

    @nnx.jit
    def step(model, optimizer, x):
        grads = nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x)
        optimizer.update(model, grads)

    step(model, optimizer, x)
    after = _raw(model)
    jax.tree.map(np.testing.assert_array_equal, after["layer_instance"], before["layer_instance"])
    for name in ("lora_a", "lora_b"):
        assert np.any(after[name]["kernel"] != before[name]["kernel"])


def _merged_loss(kernel, bias, a, b, x, scale):
    return jnp.sum(jnp.tanh(x @ (kernel + scale * a @ b) + bias))


@pytest.mark.parametrize("freeze_base", [True, False], ids=["frozen", "trained"])
def test_gradients_equal_the_merged_form_and_a_frozen_base_gets_zero(freeze_base):
    model = LoRA(
        nnx.Linear(6, 5, rngs=nnx.Rngs(0)),
        rank=2,
        alpha=4.0,
        b_init=RANDOM_B,
        freeze_base=freeze_base,
        rngs=nnx.Rngs(1),
    )
    x = _normal(2, (4, 6))
    grads = nnx.to_pure_dict(nnx.grad(_loss)(model, x))
    layer = model.layer_instance
    expected = jax.grad(_merged_loss, argnums=(0, 1, 2, 3))(
        layer.kernel[...],
        layer.bias[...],
        model.lora_a["kernel"][...],
        model.lora_b["kernel"][...],
        x,
        2.0,
    )
    kernel_grad = grads["layer_instance"]["kernel"]
    if freeze_base:
        assert not np.any(np.asarray(kernel_grad))
    else:
        np.testing.assert_allclose(kernel_grad, expected[0], rtol=1e-5, atol=1e-6)
    got = (grads["layer_instance"]["bias"], grads["lora_a"]["kernel"], grads["lora_b"]["kernel"])
    chex.assert_trees_all_close(got, expected[1:], rtol=1e-5, atol=1e-6)


def test_the_raw_kernel_stays_bit_identical_after_forward_grad_and_jit():
    model = LoRA(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rank=2, b_init=RANDOM_B, rngs=nnx.Rngs(1))
    before = _raw(model)
    x = _normal(2, (2, 4))
    model(x)
    nnx.grad(_loss)(model, x)
    nnx.jit(_loss)(model, x)
    jax.jit(nnx.grad(_loss))(model, x)
    jax.tree.map(np.testing.assert_array_equal, _raw(model), before)


# -- the cost is the unmerged form's --------------------------------------------------------


def test_forward_flops_are_the_unmerged_forms():
    n, i, o, r, scale = 8, 32, 16, 4, 2.0
    model = LoRA(nnx.Linear(i, o, rngs=nnx.Rngs(0)), rank=r, alpha=8.0, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((n, i), jnp.float32)

    def wrapped(state, x):
        return nnx.merge(graphdef, state)(x)

    def unmerged(w, bias, a, b, x):
        return x @ w + scale * ((x @ a) @ b) + bias

    def merged(w, bias, a, b, x):
        return x @ (w + scale * a @ b) + bias

    arrays = (
        jax.ShapeDtypeStruct((i, o), jnp.float32),
        jax.ShapeDtypeStruct((o,), jnp.float32),
        jax.ShapeDtypeStruct((i, r), jnp.float32),
        jax.ShapeDtypeStruct((r, o), jnp.float32),
        x,
    )
    counted = wrapkit.flops.count(wrapped, state, x).flops
    # x@W, x@A, (xA)@B; then the scale, the sum and the bias, one each per output.
    assert (
        counted
        == wrapkit.flops.count(unmerged, *arrays).flops
        == (2 * n * (i * o + i * r + r * o) + 3 * n * o)
    )
    assert counted != wrapkit.flops.count(merged, *arrays).flops


# -- uses without an unmerged form ----------------------------------------------------------


class Squares(nnx.Module):
    """A layer that uses its kernel non-linearly: ``x @ (W * W)``."""

    def __init__(self, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (4, 3)))

    def __call__(self, x):
        kernel = self.kernel[...]
        return x @ (kernel * kernel)


def test_a_non_linear_use_raises_or_runs_materialised():
    x = _normal(1, (2, 4))
    with pytest.raises(
        UnmergedError,
        match=r"LoRA\(Squares\): kernel is used by mul, which is not a linear use .*"
        r"materialize=True",
    ):
        LoRA(Squares(nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(1))(x)
    model = LoRA(Squares(nnx.Rngs(0)), rank=2, b_init=RANDOM_B, materialize=True, rngs=nnx.Rngs(1))
    kernel = _f64(model.layer_instance.kernel[...]) + _delta(model, "kernel", (0,), (1,))
    np.testing.assert_allclose(model(x), _f64(x) @ (kernel * kernel), rtol=1e-5, atol=1e-5)


def test_a_use_contracting_other_axes_than_feature_axes_says_which_to_pass():
    model = LoRA(nnx.Einsum("btd,dnh->btnh", (5, 2, 3), rngs=nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(1))
    with pytest.raises(UnmergedError, match=r"output axes are \[2\]\. Pass feature_axes=\(1, 2\)"):
        model(jnp.ones((2, 3, 5)))


# -- dropout --------------------------------------------------------------------------------


def _identity(key, shape, dtype):
    return jnp.eye(*shape, dtype=dtype)


def _dropping(**options) -> LoRA:
    """y = x + dropout(x): a zero kernel and identity factors."""
    layer = nnx.Linear(6, 6, use_bias=False, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))
    return LoRA(
        layer,
        rank=6,
        a_init=_identity,
        b_init=_identity,
        dropout_rate=0.5,
        rngs=nnx.Rngs(1),
        **options,
    )


def test_dropout_drops_only_the_adapter_input_and_follows_train_and_eval():
    x = jnp.ones((4, 6))
    model = _dropping(deterministic=False)
    y = np.asarray(model(x))
    assert set(np.unique(y)) == {0.0, 2.0}  # exact: 1 / (1 - 0.5)
    assert np.any(np.asarray(model(x)) != y)  # a new key each call
    np.testing.assert_array_equal(model(x, deterministic=True), x)
    model.eval()
    assert model.deterministic is True
    np.testing.assert_array_equal(model(x), x)
    assert set(np.unique(np.asarray(model(x, deterministic=False)))) == {0.0, 2.0}
    model.train()
    assert model.deterministic is False
    np.testing.assert_array_equal(nnx.view(model, deterministic=True)(x), x)


def test_dropout_is_reproducible_from_the_same_rngs():
    x = _normal(2, (4, 6))
    first, second, jitted = (_dropping(deterministic=False) for _ in range(3))
    y = first(x)
    np.testing.assert_array_equal(y, second(x))
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(jitted, x), y, rtol=1e-6)
    # The next call draws the next key, under jit as eagerly.
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(jitted, x), first(x), rtol=1e-6)


def test_dropout_with_deterministic_unset_asks_for_it():
    model = _dropping()
    with pytest.raises(ValueError, match=r"dropout_rate=0\.5, but deterministic is None: call "):
        model(jnp.ones((1, 6)))


# -- dtypes, sharding, invert ---------------------------------------------------------------


def test_bfloat16_layers_and_factors_keep_their_dtype():
    dtype = jnp.bfloat16
    layer = nnx.Linear(8, 6, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    model = LoRA(layer, rank=2, param_dtype=dtype, b_init=RANDOM_B, rngs=nnx.Rngs(1))
    assert model.lora_a["kernel"].dtype == model.lora_b["kernel"].dtype == dtype
    x = _normal(2, (4, 8), dtype)
    y = model(x)
    assert y.dtype == dtype
    weight = _f64(layer.kernel[...]) + _delta(model, "kernel", (0,), (1,))
    expected = _f64(x) @ weight + _f64(layer.bias[...])
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=5e-2, atol=5e-2)


def test_factors_are_sharded_like_the_axes_they_span():
    init = nnx.with_partitioning(
        nnx.initializers.lecun_normal(), ("embed", "mlp"), eager_sharding=False
    )
    model = LoRA(nnx.Linear(4, 6, kernel_init=init, rngs=nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(1))
    assert model.lora_a["kernel"].get_metadata()["out_sharding"] == ("embed", None)
    assert model.lora_b["kernel"].get_metadata()["out_sharding"] == (None, "mlp")


def test_invert_keeps_the_weight_and_zeroes_b():
    model = LoRA(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rank=2, b_init=RANDOM_B, rngs=nnx.Rngs(1))
    (leaf,) = model._selected_leaves()
    inverse = model.invert(leaf)
    np.testing.assert_array_equal(inverse.value, model.layer_instance.kernel[...])
    assert inverse.variables["lora_b"].shape == (2, 3)
    assert not np.any(np.asarray(inverse.variables["lora_b"]))


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"rank": 0}, r"rank must be a positive int, got 0\. Pass e\.g\. rank=8"),
        ({"alpha": -1.0}, r"alpha must be a positive number or None \(alpha = rank\), got -1\.0"),
        ({"dropout_rate": 1.0}, r"dropout_rate must be a number in \[0, 1\), got 1\.0"),
        ({"deterministic": "yes"}, r"deterministic must be True, False or None"),
        ({"feature_axes": None}, r"feature_axes must be an int or a non-empty tuple of ints"),
        ({"b_init": 0.0}, r"b_init must be an initializer .*nnx\.initializers\.zeros"),
        ({"variable_type": int}, r"variable_type must be an nnx\.Variable subclass"),
    ],
    ids=["rank0", "alpha", "rate", "deterministic", "axes", "init", "variable_type"],
)
def test_bad_options_are_refused_when_built(options, match):
    with pytest.raises(ValueError, match=r"^LoRA\(Linear\)") as error:
        LoRA(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), **options)
    assert error.match(match)


def test_a_rank_larger_than_the_kernel_allows_is_refused_when_built():
    with pytest.raises(
        ValueError,
        match=r"LoRA\(Linear\): rank=5 is larger than 'kernel' of shape \(4, 3\) allows: .* "
        r"Use rank <= 3\.",
    ):
        LoRA(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rank=5, rngs=nnx.Rngs(1))


def test_feature_axes_out_of_range_and_missing_rngs_are_refused():
    layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"feature_axes=\(0, 1\) does not leave an input axis of 'kernel'"
    ):
        LoRA(layer, feature_axes=(0, 1), rank=1, rngs=nnx.Rngs(1))
    with pytest.raises(TypeError, match=r"LoRA\(Linear\) needs rngs=nnx\.Rngs\(\.\.\.\)"):
        LoRA(layer, rank=1, rngs=None)
