"""LoRA: outputs against numpy, the unmerged form's cost against a hand-written one, errors."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import wrapkit
from wrapkit.linen import LoRA, SpectralNorm, WeightNorm, Wrapper

JIT = [pytest.param(lambda f: f, id="eager"), pytest.param(jax.jit, id="jit")]
RANDOM_B = nn.initializers.normal(1.0)


def _key(i: int) -> jax.Array:
    return jax.random.key(i)


def _normal(i: int, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(_key(i), shape)


def _factors(params: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(params[f"{name}/lora_a"], np.float64), np.asarray(
        params[f"{name}/lora_b"], np.float64
    )


def _delta(a: np.ndarray, b: np.ndarray, input_axes, output_axes, scale: float) -> np.ndarray:
    """``scale * a @ b`` laid out with the weight's axes in their places (numpy)."""
    rank = a.shape[-1]
    full = (a.reshape(-1, rank) @ b.reshape(rank, -1)).reshape(a.shape[:-1] + b.shape[1:])
    order = list(input_axes) + list(output_axes)
    return scale * np.transpose(full, [order.index(axis) for axis in range(len(order))])


# -- outputs against an independent numpy computation --------------------------------------


def _np_conv(x: np.ndarray, w: np.ndarray, stride: int, padding: int) -> np.ndarray:
    x = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    kh, kw = w.shape[:2]
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    y = np.zeros((x.shape[0], out_h, out_w, w.shape[-1]))
    for i in range(out_h):
        for j in range(out_w):
            patch = x[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
            y[:, i, j] = np.einsum("nhwc,hwco->no", patch, w)
    return y


CASES = {
    "dense": (
        nn.Dense(5),
        (4, 6),
        ((0,), (1,)),
        lambda x, w, p: x @ w + p["bias"],
    ),
    "dense_general": (
        nn.DenseGeneral((2, 3), axis=(-2, -1)),
        (2, 4, 5),
        ((0, 1), (2, 3)),
        lambda x, w, p: np.einsum("bij,ijkl->bkl", x, w) + p["bias"],
    ),
    "einsum": (
        nn.Einsum((5, 2, 3), "btd,dnh->btnh"),
        (2, 3, 5),
        ((0,), (1, 2)),
        lambda x, w, p: np.einsum("btd,dnh->btnh", x, w) + p["bias"],
    ),
    "einsum_middle_input": (
        nn.Einsum((2, 5, 3), "btd,ndh->btnh", use_bias=False),
        (2, 3, 5),
        ((1,), (0, 2)),
        lambda x, w, p: np.einsum("btd,ndh->btnh", x, w),
    ),
    "conv": (
        nn.Conv(4, (3, 3), padding=1),
        (2, 6, 6, 3),
        ((0, 1, 2), (3,)),
        lambda x, w, p: _np_conv(x, w, 1, 1) + p["bias"],
    ),
    "conv_strided": (
        nn.Conv(4, (3, 3), strides=2, padding="VALID"),
        (1, 7, 7, 3),
        ((0, 1, 2), (3,)),
        lambda x, w, p: _np_conv(x, w, 2, 0) + p["bias"],
    ),
}


@pytest.mark.parametrize("jit", JIT)
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_outputs_equal_numpy_on_the_merged_weight(case, jit):
    layer, shape, (input_axes, output_axes), forward = CASES[case]
    model = LoRA(layer, rank=2, alpha=3.0, b_init=RANDOM_B)
    x = _normal(1, shape)
    variables = model.init(_key(0), x)
    params = variables["params"]
    a, b = _factors(params, "layer_instance/kernel")
    assert a.shape[:-1] == tuple(params["layer_instance"]["kernel"].shape[i] for i in input_axes)
    assert b.shape[1:] == tuple(params["layer_instance"]["kernel"].shape[i] for i in output_axes)
    inner = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), params["layer_instance"])
    weight = inner["kernel"] + _delta(a, b, input_axes, output_axes, 1.5)
    expected = forward(np.asarray(x, np.float64), weight, inner)
    y = jit(model.apply)(variables, x)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("jit", JIT)
def test_a_tied_embedding_takes_one_delta_in_lookup_and_attend(jit):
    model = LoRA(nn.Embed(11, 6), rank=3, b_init=RANDOM_B, delegates=("__call__", "attend"))
    ids = jnp.array([[0, 3, 10], [7, 7, 1]])
    variables = model.init(_key(0), ids)
    params = variables["params"]
    a, b = _factors(params, "layer_instance/embedding")
    assert a.shape == (11, 3) and b.shape == (3, 6)
    table = np.asarray(params["layer_instance"]["embedding"], np.float64) + a @ b
    rows = jit(model.apply)(variables, ids)
    np.testing.assert_allclose(np.asarray(rows), table[np.asarray(ids)], rtol=1e-5, atol=1e-5)
    query = _normal(2, (4, 6))
    logits = jit(functools.partial(model.apply, method="attend"))(variables, query)
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(query, np.float64) @ table.T, rtol=1e-5, atol=1e-5
    )
    # The same factors whichever method runs first.
    first_attend = model.init(_key(0), query, method="attend")
    assert jax.tree_util.tree_map(jnp.shape, first_attend) == jax.tree_util.tree_map(
        jnp.shape, variables
    )


def test_outputs_start_unchanged_and_scale_follows_alpha_and_rslora():
    x = _normal(1, (3, 8))
    dense = nn.Dense(4)
    plain = dense.init(_key(0), x)
    model = LoRA(dense, rank=4)
    variables = model.init(_key(0), x)
    variables["params"]["layer_instance"] = plain["params"]
    np.testing.assert_allclose(model.apply(variables, x), dense.apply(plain, x), atol=1e-6)
    assert LoRA(dense, rank=4, alpha=16.0).scale == 4.0
    assert LoRA(dense, rank=4, alpha=16.0, rslora=True).scale == 8.0
    assert LoRA(dense, rank=4).scale == 1.0


# -- gradients ------------------------------------------------------------------------------


def _merged_loss(params, x, scale):
    inner = params["layer_instance"]
    a, b = params["layer_instance/kernel/lora_a"], params["layer_instance/kernel/lora_b"]
    kernel = inner["kernel"] + scale * a @ b
    return jnp.sum(jnp.tanh(x @ kernel + inner["bias"]))


@pytest.mark.parametrize("freeze_base", [True, False], ids=["frozen", "trained"])
def test_gradients_equal_the_merged_form_and_a_frozen_base_gets_zero(freeze_base):
    model = LoRA(nn.Dense(5), rank=2, alpha=4.0, b_init=RANDOM_B, freeze_base=freeze_base)
    x = _normal(1, (4, 6))
    variables = model.init(_key(0), x)
    grads = jax.grad(lambda v: jnp.sum(jnp.tanh(model.apply(v, x))))(variables)["params"]
    expected = jax.grad(_merged_loss)(variables["params"], x, 2.0)
    if freeze_base:
        assert not np.any(np.asarray(grads["layer_instance"]["kernel"]))
        expected["layer_instance"]["kernel"] = jnp.zeros_like(expected["layer_instance"]["kernel"])
    chex.assert_trees_all_close(grads, expected, rtol=1e-5, atol=1e-6)


# -- the cost is the unmerged form's --------------------------------------------------------


class _HandWritten(nn.Module):
    """A layer plus ``s * f(x; A @ B)`` computed through the factors, written by hand."""

    kind: str
    rank: int = 4
    scale: float = 2.0

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(1.0)
        if self.kind == "dense":
            w = jax.lax.stop_gradient(self.param("kernel", init, (x.shape[-1], 16)))
            a = self.param("a", init, (x.shape[-1], self.rank))
            b = self.param("b", init, (self.rank, 16))
            return x @ w + self.scale * ((x @ a) @ b)
        if self.kind == "einsum":
            w = jax.lax.stop_gradient(self.param("kernel", init, (x.shape[-1], 2, 8)))
            a = self.param("a", init, (x.shape[-1], self.rank))
            b = self.param("b", init, (self.rank, 2, 8))
            base = jnp.einsum("btd,dnh->btnh", x, w)
            return base + self.scale * jnp.einsum("btr,rnh->btnh", x @ a, b)
        if self.kind == "conv":
            dn = ("NHWC", "HWIO", "NHWC")
            w = jax.lax.stop_gradient(self.param("kernel", init, (3, 3, x.shape[-1], 16)))
            a = self.param("a", init, (3, 3, x.shape[-1], self.rank))
            b = self.param("b", init, (self.rank, 16))

            def conv(kernel):
                return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dn)

            return conv(w) + self.scale * (conv(a) @ b)
        if self.kind == "embed":
            table = jax.lax.stop_gradient(self.param("embedding", init, (50, 16)))
            a = self.param("a", init, (50, self.rank))
            b = self.param("b", init, (self.rank, 16))
            # Embed's lookup (jnp.take), with the indices normalised once for both tables.
            ids = jnp.where(x < 0, x + 50, x)[..., None]
            dn = jax.lax.GatherDimensionNumbers((2,), (0,), (0,))

            def rows(t):
                return jax.lax.gather(t, ids, dn, (1, t.shape[1]), mode="fill", fill_value=jnp.nan)

            return rows(table) + self.scale * (rows(a) @ b)
        raise ValueError(self.kind)


LAYERS = {
    "dense": (nn.Dense(16, use_bias=False), (8, 32), jnp.float32),
    "einsum": (nn.Einsum((32, 2, 8), "btd,dnh->btnh", use_bias=False), (2, 4, 32), jnp.float32),
    "conv": (nn.Conv(16, (3, 3), use_bias=False), (2, 8, 8, 3), jnp.float32),
    "embed": (nn.Embed(50, 16), (4, 6), jnp.int32),
}


@pytest.mark.parametrize("kind", LAYERS, ids=list(LAYERS))
def test_forward_and_vjp_flops_equal_a_hand_written_unmerged_layer(kind):
    layer, shape, dtype = LAYERS[kind]
    x = jax.ShapeDtypeStruct(shape, dtype)
    wrapped = wrapkit.summary(LoRA(layer, rank=4, alpha=8.0), x, vjp=True)
    reference = wrapkit.summary(_HandWritten(kind), x, vjp=True)
    assert wrapped.flops == reference.flops > 0
    assert wrapped.vjp_flops == reference.vjp_flops > 0
    assert wrapped.transcendentals == reference.transcendentals
    # The adapter's cost is on the LoRA row, the base layer's on the inner row.
    lora_row, base_row = wrapped.rows[0], wrapped.rows[1]
    assert lora_row.wrapper and base_row.parent == 0
    plain = wrapkit.summary(layer, x, vjp=True)
    assert base_row.flops == plain.flops
    assert lora_row.own_flops == wrapped.flops - plain.flops > 0


def test_unmerged_forward_count_equals_xlas():
    model = LoRA(nn.Dense(64), rank=8)
    x = jnp.ones((16, 32))
    variables = model.init(_key(0), x)
    counted = wrapkit.flops.count(model.apply, variables, x).flops
    xla = jax.jit(model.apply).lower(variables, x).cost_analysis()["flops"]
    assert counted == xla


def test_the_vjp_of_the_unmerged_form_skips_the_full_weight_gradient():
    """Matmul FLOPs of the VJP, derived by hand for both forms (base frozen, input too)."""
    n, i, o, r = 32, 64, 48, 4
    x = jax.ShapeDtypeStruct((n, i), jnp.float32)

    class Merged(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = jax.lax.stop_gradient(self.param("kernel", nn.initializers.zeros, (i, o)))
            a = self.param("a", nn.initializers.zeros, (i, r))
            b = self.param("b", nn.initializers.zeros, (r, o))
            return x @ (w + a @ b)

    unmerged = wrapkit.summary(LoRA(nn.Dense(o, use_bias=False), rank=r), x, vjp=True)
    merged = wrapkit.summary(Merged(), x, vjp=True)
    # Unmerged: forward x@W, x@A, (xA)@B; backward dx = dy@W^T, d(xA) = dy@B^T,
    # dB = (xA)^T dy, dx += d(xA)@A^T, dA = x^T d(xA). Never x^T dy.
    assert unmerged.vjp_primitives["dot_general"].flops == 2 * n * (
        i * o + i * r + r * o
    ) + 2 * n * (i * o + o * r + r * o + r * i + i * r)
    # Merged: forward A@B, x@(W+AB); backward dx, the full-size x^T dy, then dA and dB.
    assert merged.vjp_primitives["dot_general"].flops == 2 * (i * r * o + n * i * o) + 2 * (
        n * i * o + n * i * o + i * o * r + i * o * r
    )


# -- transforms, stacks, state --------------------------------------------------------------


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(6)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(3)(nn.relu(x))


class _Unchanged(Wrapper):
    """Runs the block on its own kernels: the reference with the same scopes (and RNGs)."""

    variable_filter = "kernel"

    def transform(self, leaf):
        return leaf.value


def test_a_wrapped_block_updates_its_batch_stats_and_uses_its_rngs():
    x = _normal(1, (8, 4))
    model = LoRA(_Block(), rank=2)
    variables = model.init(_key(0), x)
    reference = _Unchanged(_Block())
    rngs = {"dropout": _key(5)}
    expected, expected_stats = reference.apply(
        {
            "params": {"layer_instance": variables["params"]["layer_instance"]},
            "batch_stats": variables["batch_stats"],
        },
        x,
        train=True,
        rngs=rngs,
        mutable=["batch_stats"],
    )
    y, stats = model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])
    np.testing.assert_allclose(y, expected, atol=1e-5)
    chex.assert_trees_all_close(stats, expected_stats, atol=1e-6)
    assert np.any(np.asarray(y) == 0)  # dropout ran
    # Both kernels of the block take a delta.
    assert sorted(k for k in variables["params"] if k != "layer_instance") == [
        "layer_instance/Dense_0/kernel/lora_a",
        "layer_instance/Dense_0/kernel/lora_b",
        "layer_instance/Dense_1/kernel/lora_a",
        "layer_instance/Dense_1/kernel/lora_b",
    ]


class _Stack(nn.Module):
    lift: str

    @nn.compact
    def __call__(self, x):
        class Layer(nn.Module):
            @nn.compact
            def __call__(self, carry, _):
                return nn.tanh(LoRA(nn.Dense(5), rank=2, b_init=RANDOM_B)(carry)), None

        if self.lift == "scan":
            scanned = nn.scan(
                Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
            )
            return scanned()(x, None)[0]
        block = nn.remat(Layer)()
        return block(block(x, None)[0], None)[0]


@pytest.mark.parametrize("lift", ["scan", "remat"])
def test_under_nn_scan_and_nn_remat_against_a_python_loop(lift):
    x = _normal(1, (2, 5))
    model = _Stack(lift)
    variables = model.init(_key(0), x)
    y = jax.jit(model.apply)(variables, x)
    root = variables["params"][next(iter(variables["params"]))]

    def slices():
        if lift == "scan":
            n = root["Dense_0"]["kernel"].shape[0]
            return [jax.tree_util.tree_map(lambda v, k=k: v[k], root) for k in range(n)]
        return [root, root]

    h = x
    for p in slices():
        kernel = (
            p["Dense_0"]["kernel"]
            + p["LoRA_0"]["Dense_0/kernel/lora_a"] @ p["LoRA_0"]["Dense_0/kernel/lora_b"]
        )
        h = jnp.tanh(h @ kernel + p["Dense_0"]["bias"])
    np.testing.assert_allclose(y, h, atol=1e-5)
    grads = jax.grad(lambda v: model.apply(v, x).sum())(variables)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(grads))


def test_stacked_outside_weight_norm_and_spectral_norm():
    x = _normal(1, (3, 4))
    for inner_wrapper in (WeightNorm, SpectralNorm):
        model = LoRA(inner_wrapper(nn.Dense(5)), rank=2, b_init=RANDOM_B)
        kwargs = {"update_stats": False} if inner_wrapper is SpectralNorm else {}
        variables = model.init(_key(0), x, **kwargs)
        params = variables["params"]
        normalised = inner_wrapper(nn.Dense(5))
        inner_vars = {collection: tree["layer_instance"] for collection, tree in variables.items()}
        # The kernel the normalisation gives, from the inner wrapper alone.
        captured = {}

        def grab(next_fun, args, kwargs, context, captured=captured):
            if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
                captured["kernel"] = context.module.variables["params"]["kernel"]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(grab):
            normalised.apply(inner_vars, x, **kwargs)
        a = params["layer_instance/kernel/lora_a"]
        b = params["layer_instance/kernel/lora_b"]
        dense = params["layer_instance"]["layer_instance"]
        expected = x @ (captured["kernel"] + a @ b) + dense["bias"]
        np.testing.assert_allclose(model.apply(variables, x, **kwargs), expected, atol=1e-5)


def test_a_normalisation_outside_lora_is_refused_with_the_order_that_works():
    model = WeightNorm(LoRA(nn.Dense(3), rank=1))
    with pytest.raises(ValueError, match=r"no unmerged form\. Put LoRA outermost"):
        model.init(_key(0), jnp.ones((1, 2)))


class _Squares(nn.Module):
    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1], 3))
        return x @ (kernel * kernel)


def test_a_non_linear_use_raises_or_runs_materialised():
    x = _normal(1, (2, 4))
    with pytest.raises(
        ValueError,
        match=r"LoRA\(layer_instance\): params/layer_instance/kernel is used by mul"
        r".*materialize=True",
    ):
        LoRA(_Squares(), rank=2).init(_key(0), x)
    model = LoRA(_Squares(), rank=2, b_init=RANDOM_B, materialize=True)
    variables = model.init(_key(0), x)
    params = variables["params"]
    kernel = params["layer_instance"]["kernel"] + (
        params["layer_instance/kernel/lora_a"] @ params["layer_instance/kernel/lora_b"]
    )
    np.testing.assert_allclose(model.apply(variables, x), x @ (kernel * kernel), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
def test_low_precision_layers_keep_their_dtype(dtype):
    x = _normal(1, (4, 8)).astype(dtype)
    model = LoRA(nn.Dense(6, dtype=dtype, param_dtype=dtype), rank=2, b_init=RANDOM_B)
    variables = model.init(_key(0), x)
    y = model.apply(variables, x)
    assert y.dtype == dtype
    params = jax.tree_util.tree_map(lambda v: v.astype(jnp.float32), variables["params"])
    a, b = params["layer_instance/kernel/lora_a"], params["layer_instance/kernel/lora_b"]
    expected = (
        x.astype(jnp.float32) @ (params["layer_instance"]["kernel"] + a @ b)
        + params["layer_instance"]["bias"]
    )
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=5e-2, atol=5e-2)


def test_dropout_drops_only_the_adapter_input():
    eye = lambda key, shape, dtype: jnp.eye(*shape, dtype=dtype)  # noqa: E731
    dense = nn.Dense(6, use_bias=False, kernel_init=nn.initializers.zeros)
    model = LoRA(dense, rank=6, a_init=eye, b_init=eye, dropout_rate=0.5, deterministic=False)
    x = jnp.ones((4, 6))
    variables = model.init({"params": _key(0), "dropout": _key(1)}, x)
    y = np.asarray(model.apply(variables, x, rngs={"dropout": _key(2)}))
    assert set(np.unique(y)) == {0.0, 2.0}
    off = model.clone(deterministic=True)
    np.testing.assert_array_equal(off.apply(variables, x), x)


def test_summary_shows_the_adapter_parameters_on_the_wrapper_row():
    x = jax.ShapeDtypeStruct((2, 8), jnp.float32)
    summary = wrapkit.summary(LoRA(nn.Dense(4), rank=2), x)
    assert summary.rows[0].variables["params"].count == 8 * 2 + 2 * 4
    assert summary.rows[1].variables["params"].count == 8 * 4 + 4


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, r"rank must be a positive int, got 0"),
        ({"rank": 2.0}, r"rank must be a positive int, got 2\.0"),
        ({"alpha": -1.0}, r"alpha must be a positive number or None"),
        ({"dropout_rate": 1.0}, r"dropout_rate must be a number in \[0, 1\)"),
        ({"dropout_rate": 0.1}, r"needs deterministic=True or False"),
        ({"feature_axes": "last"}, r"feature_axes must be None"),
        ({"materialize": "yes"}, r"materialize must be True or False"),
        ({"b_init": 0.0}, r"b_init must be an initializer"),
    ],
    ids=["rank0", "rank_float", "alpha", "rate", "deterministic", "axes", "materialize", "init"],
)
def test_bad_options_are_refused_when_built(kwargs, match):
    with pytest.raises(ValueError, match=r"LoRA\(Dense_0\|Dense\)|LoRA\(") as error:
        LoRA(nn.Dense(3), **kwargs)
    assert error.match(match)


def test_a_rank_larger_than_the_kernel_allows_is_refused():
    with pytest.raises(ValueError, match=r"rank=5 is larger than .*kernel.* Use rank <= 3"):
        LoRA(nn.Dense(3), rank=5).init(_key(0), jnp.ones((1, 4)))


# -- lifecycle ------------------------------------------------------------------------------


class _Tied(nn.Module):
    """A Dense and a tied embedding, with or without LoRA on both."""

    wrap: bool

    @nn.compact
    def __call__(self, ids, x):
        dense, embed = nn.Dense(6), nn.Embed(10, 6)
        if self.wrap:
            dense = LoRA(dense, rank=2, alpha=4.0, b_init=RANDOM_B)
            embed = LoRA(embed, rank=2, b_init=RANDOM_B, delegates=("__call__", "attend"))
        return embed.attend(dense(x) + embed(ids))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_fold_merges_every_adapter_and_keeps_the_tied_embedding_one_variable(dtype):
    ids, x = jnp.array([1, 7, 3]), _normal(1, (3, 4))
    wrapped, plain = _Tied(True), _Tied(False)
    variables = wrapped.init(_key(0), ids, x)
    variables = jax.tree_util.tree_map(lambda v: v.astype(dtype), variables)
    folded = wrapkit.linen.fold(wrapped, variables, ids, x)
    assert jax.tree_util.tree_structure(folded) == jax.tree_util.tree_structure(
        plain.init(_key(0), ids, x)
    )
    # The merged weights, computed in float64 from the same variables and cast once.
    params = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), variables["params"])
    a, b = params["LoRA_0"]["Dense_0/kernel/lora_a"], params["LoRA_0"]["Dense_0/kernel/lora_b"]
    kernel = params["Dense_0"]["kernel"] + 2.0 * a @ b
    a, b = (
        params["LoRA_1"]["Embed_0/embedding/lora_a"],
        params["LoRA_1"]["Embed_0/embedding/lora_b"],
    )
    table = params["Embed_0"]["embedding"] + a @ b
    for got, expected in [
        (folded["params"]["Dense_0"]["kernel"], kernel),
        (folded["params"]["Embed_0"]["embedding"], table),
    ]:
        assert got.dtype == dtype
        np.testing.assert_allclose(
            np.asarray(got, np.float64),
            np.asarray(jnp.asarray(expected, jnp.float32).astype(dtype), np.float64),
            rtol=1e-5 if dtype == jnp.float32 else 0,
            atol=1e-5 if dtype == jnp.float32 else float(jnp.finfo(dtype).eps) * 8,
        )
    if dtype == jnp.float32:
        np.testing.assert_allclose(
            plain.apply(folded, ids, x), wrapped.apply(variables, ids, x), atol=1e-5
        )


def test_wrap_pretrained_gives_a_zero_adapter_and_unchanged_outputs():
    ids, x = jnp.array([1, 7, 3]), _normal(1, (3, 4))
    wrapped, plain = _Tied(True), _Tied(False)
    pretrained = plain.init(_key(3), ids, x)
    variables = wrapkit.linen.wrap_pretrained(wrapped, pretrained, ids, x, rngs=_key(1))
    assert not np.any(np.asarray(variables["params"]["LoRA_0"]["Dense_0/kernel/lora_b"]))
    assert np.any(np.asarray(variables["params"]["LoRA_0"]["Dense_0/kernel/lora_a"]))
    np.testing.assert_array_equal(wrapped.apply(variables, ids, x), plain.apply(pretrained, ids, x))


# -- expert-stacked kernels -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("equation", "kernel_shape", "x_shape"),
    [
        ("ebd,edh->ebh", (3, 5, 4), (3, 2, 5)),
        ("bed,edh->beh", (3, 5, 4), (2, 3, 5)),
        ("ebd,ehd->ebh", (3, 4, 5), (3, 2, 5)),
    ],
    ids=["experts-first", "experts-middle", "kernel-out-in"],
)
def test_an_expert_stacked_kernel_gets_one_delta_per_expert(equation, kernel_shape, x_shape):
    model = LoRA(nn.Einsum(kernel_shape, equation, use_bias=False), rank=2, b_init=RANDOM_B)
    x = _normal(1, x_shape)
    variables = model.init(_key(0), x)
    params = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64), variables["params"])
    a, b = params["layer_instance/kernel/lora_a"], params["layer_instance/kernel/lora_b"]
    assert a.shape == (3, 5, 2) and b.shape == (3, 2, 4)  # (experts, in, r), (experts, r, out)
    delta = np.einsum("edr,erh->edh", a, b)
    if equation == "ebd,ehd->ebh":
        delta = delta.transpose(0, 2, 1)
    weight = params["layer_instance"]["kernel"] + delta
    expected = np.einsum(equation, np.asarray(x, np.float64), weight)
    np.testing.assert_allclose(model.apply(variables, x), expected, rtol=1e-5, atol=1e-5)
    # The cost is per expert's factors: the same as writing the batched form by hand.

    class ByHand(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.initializers.normal(1.0)
            w = jax.lax.stop_gradient(self.param("kernel", init, kernel_shape))
            a = self.param("a", init, (3, 5, 2))
            b = self.param("b", init, (3, 2, 4))
            if equation == "bed,edh->beh":
                low = jnp.einsum("ber,erh->beh", jnp.einsum("bed,edr->ber", x, a), b)
            else:
                low = jnp.einsum("ebr,erh->ebh", jnp.einsum("ebd,edr->ebr", x, a), b)
            return jnp.einsum(equation, x, w) + 1.0 * low

    spec = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    wrapped, reference = (
        wrapkit.summary(model, spec, vjp=True),
        wrapkit.summary(ByHand(), spec, vjp=True),
    )
    assert wrapped.primitives["dot_general"] == reference.primitives["dot_general"]
    assert wrapped.vjp_primitives["dot_general"] == reference.vjp_primitives["dot_general"]
    folded = wrapkit.linen.fold(model, variables, x)
    np.testing.assert_allclose(folded["params"]["kernel"], weight, rtol=1e-5, atol=1e-5)
