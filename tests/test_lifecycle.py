"""fold, wrap_pretrained and init_from_data, against plain flax models and numpy by hand.

Every expected value comes from the same model built without wrappers (flax's own layers)
run on weights computed here in float64 numpy: weight normalisation, power iteration, the
top singular pair, batch statistics.
"""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wrapkit.linen import (
    Inverse,
    LoRA,
    SpectralNorm,
    WeightNorm,
    Wrapper,
    fold,
    init_from_data,
    wrap_pretrained,
)

X = jax.random.normal(jax.random.key(1), (5, 4))
KEY = jax.random.key(0)


@pytest.fixture(params=[lambda f: f, jax.jit], ids=["eager", "jit"])
def variant(request):
    return request.param


# -- by hand ------------------------------------------------------------------------------


def normalised(kernel, scale):
    """Weight normalisation: one norm per output feature (the last axis), float64."""
    kernel = np.asarray(kernel, np.float64)
    norm = np.sqrt((kernel**2).sum(axis=tuple(range(kernel.ndim - 1)), keepdims=True))
    return kernel / norm * np.asarray(scale, np.float64)


def spectral(kernel, u, n_steps=1):
    """Spectral normalisation with n_steps of power iteration from u, float64."""
    kernel = np.asarray(kernel, np.float64)
    matrix, u = kernel.reshape(-1, kernel.shape[-1]), np.asarray(u, np.float64)
    for _ in range(n_steps):
        v = u @ matrix.T
        v /= np.linalg.norm(v)
        u = v @ matrix
        u /= np.linalg.norm(u)
    return kernel / (v @ matrix @ u.T)[0, 0]


def randomised(variables, seed=1):
    """Every leaf whose name ends in 'scale' drawn in [0.5, 2]: a misplaced scale shows."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [
        jax.random.uniform(k, leaf.shape, leaf.dtype, 0.5, 2.0)
        if jax.tree_util.keystr(path).endswith("scale']")
        else leaf
        for k, (path, leaf) in zip(keys, leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def shapes(tree):
    return jax.tree_util.tree_map(jnp.shape, tree)


def assert_close(actual, expected, rtol=1e-5, atol=1e-5):
    chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


def pair(build, wrapper=WeightNorm):
    """``build(wrap)`` inside a parent's @nn.compact, with and without the wrapper."""

    class Top(nn.Module):
        wrapped: bool

        @nn.compact
        def __call__(self, x):
            return build(wrapper if self.wrapped else (lambda module: module))(x)

    return Top(True), Top(False)


def two_layers(wrap):
    """A wrapped Dense_0 followed by a plain Dense_1."""

    def forward(x):
        hidden = nn.relu(wrap(nn.Dense(3))(x))
        return nn.Dense(2)(hidden)

    return forward


class SetupTop(nn.Module):
    """A wrapper assigned in setup: its inner module lives at fc/layer_instance."""

    wrapped: bool

    def setup(self):
        self.fc = WeightNorm(nn.Dense(3)) if self.wrapped else nn.Dense(3)
        self.out = nn.Dense(2)

    def __call__(self, x):
        return self.out(nn.relu(self.fc(x)))


# -- fold ---------------------------------------------------------------------------------


def test_fold_a_wrapper_built_in_compact(variant):
    """The inner Dense_0 is WeightNorm_0's sibling; the Dense after it stays Dense_1."""
    wrapped, plain = pair(two_layers)
    variables = randomised(wrapped.init(KEY, X))
    assert set(variables["params"]["WeightNorm_0"]) == {"Dense_0/kernel/scale"}
    folded = variant(lambda v: fold(wrapped, v, X))(variables)
    assert shapes(folded) == shapes(plain.init(KEY, X))
    params = variables["params"]
    expected = {
        "Dense_0": {
            "kernel": normalised(
                params["Dense_0"]["kernel"], params["WeightNorm_0"]["Dense_0/kernel/scale"]
            ),
            "bias": params["Dense_0"]["bias"],
        },
        "Dense_1": params["Dense_1"],
    }
    assert_close(folded["params"], expected)
    assert_close(plain.apply(folded, X), wrapped.apply(variables, X))


def test_fold_a_wrapper_assigned_in_setup(variant):
    variables = randomised(SetupTop(True).init(KEY, X))
    assert set(variables["params"]["fc"]) == {"layer_instance", "layer_instance/kernel/scale"}
    folded = variant(lambda v: fold(SetupTop(True), v, X))(variables)
    assert shapes(folded) == shapes(SetupTop(False).init(KEY, X))
    fc = variables["params"]["fc"]
    kernel = normalised(fc["layer_instance"]["kernel"], fc["layer_instance/kernel/scale"])
    assert_close(folded["params"]["fc"], {"kernel": kernel, "bias": fc["layer_instance"]["bias"]})
    assert_close(SetupTop(False).apply(folded, X), SetupTop(True).apply(variables, X))


def test_fold_a_top_level_wrapper(variant):
    model = WeightNorm(nn.Dense(3))
    variables = randomised(model.init(KEY, X))
    folded = variant(lambda v: fold(model, v, X))(variables)
    params = variables["params"]
    kernel = normalised(params["layer_instance"]["kernel"], params["layer_instance/kernel/scale"])
    assert_close(folded, {"params": {"kernel": kernel, "bias": params["layer_instance"]["bias"]}})
    assert_close(nn.Dense(3).apply(folded, X), model.apply(variables, X))


def test_fold_a_stack_in_eval_form(variant):
    """WeightNorm(SpectralNorm(Dense)): sigma from the stored u, then normalisation."""
    model = WeightNorm(SpectralNorm(nn.Dense(3), n_steps=2))
    variables = randomised(model.init(KEY, X, update_stats=False))
    folded = variant(lambda v: fold(model, v, X, update_stats=False))(variables)
    params, stats = variables["params"], variables["batch_stats"]
    raw = params["layer_instance"]["layer_instance"]
    u = stats["layer_instance"]["layer_instance/kernel/u"]
    kernel = normalised(
        spectral(raw["kernel"], u, n_steps=2), params["layer_instance/kernel/scale"]
    )
    # The stack's own variables (a scale, u and sigma) are gone, batch_stats with them.
    assert_close(folded, {"params": {"kernel": kernel, "bias": raw["bias"]}})
    assert_close(nn.Dense(3).apply(folded, X), model.apply(variables, X, update_stats=False))


def test_fold_a_spectral_norm_uses_the_stored_u_as_the_forward_does(variant):
    wrapped = SpectralNorm(nn.Dense(3), n_steps=1)
    variables = wrapped.init(KEY, X, update_stats=False)
    # A u far from converged: one power-iteration step from it is not sigma yet.
    variables["batch_stats"]["layer_instance/kernel/u"] = jnp.array([[1.0, -0.5, 0.2]])
    folded = variant(lambda v: fold(wrapped, v, X, update_stats=False))(variables)
    raw = variables["params"]["layer_instance"]
    expected = spectral(raw["kernel"], [[1.0, -0.5, 0.2]], n_steps=1)
    assert_close(folded["params"]["kernel"], expected)
    assert "batch_stats" not in folded
    assert_close(nn.Dense(3).apply(folded, X), wrapped.apply(variables, X, update_stats=False))


@pytest.mark.parametrize("where", ["compact", "top"])
def test_fold_a_wrapped_sequential_with_batch_norm_keeps_its_statistics(variant, where):
    def block():
        return nn.Sequential(
            [nn.Dense(4), nn.BatchNorm(use_running_average=True), nn.relu, nn.Dense(2)]
        )

    if where == "top":
        wrapped, plain = WeightNorm(block()), block()
    else:
        wrapped, plain = pair(lambda wrap: wrap(block()))
    variables = randomised(wrapped.init(KEY, X))
    # Statistics that are not the initial ones, so that dropping or moving them shows.
    variables["batch_stats"] = jax.tree_util.tree_map(lambda s: s + 0.3, variables["batch_stats"])
    folded = variant(lambda v: fold(wrapped, v, X))(variables)
    assert shapes(folded) == shapes(plain.init(KEY, X))
    chex.assert_trees_all_equal(
        folded["batch_stats"],
        (
            variables["batch_stats"]["layer_instance"]
            if where == "top"
            else variables["batch_stats"]
        ),
    )
    assert_close(plain.apply(folded, X), wrapped.apply(variables, X))


class TiedLM(nn.Module):
    """An embedding used twice: to look tokens up and, through attend, as the output layer."""

    wrapped: bool

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(11, 4)
        if self.wrapped:
            embed = WeightNorm(
                embed, delegates=("__call__", "attend"), variable_filter={"embedding"}
            )
        return embed.attend(nn.tanh(embed(tokens)))


def test_fold_keeps_a_tied_weight_one_variable(variant):
    tokens = jnp.array([[1, 2, 3], [4, 5, 10]])
    variables = randomised(TiedLM(True).init(KEY, tokens))
    folded = variant(lambda v: fold(TiedLM(True), v, tokens))(variables)
    assert shapes(folded) == shapes(TiedLM(False).init(KEY, tokens))
    params = variables["params"]
    embedding = normalised(
        params["Embed_0"]["embedding"], params["WeightNorm_0"]["Embed_0/embedding/scale"]
    )
    assert_close(folded["params"]["Embed_0"]["embedding"], embedding)
    assert_close(TiedLM(False).apply(folded, tokens), TiedLM(True).apply(variables, tokens))


def test_fold_a_wrapper_inside_a_wrapped_block_applies_both():
    """The outer view normalises the kernel; the inner wrapper normalises that view."""

    class Inner(nn.Module):
        wrapped: bool

        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(3)
            return (WeightNorm(dense) if self.wrapped else dense)(nn.Dense(4)(x))

    class Top(nn.Module):
        wrapped: bool

        @nn.compact
        def __call__(self, x):
            inner = Inner(self.wrapped)
            return (WeightNorm(inner) if self.wrapped else inner)(x)

    variables = randomised(Top(True).init(KEY, X))
    folded = fold(Top(True), variables, X)
    assert shapes(folded) == shapes(Top(False).init(KEY, X))
    params = variables["params"]
    outer = params["WeightNorm_0"]
    k0 = normalised(
        normalised(params["Inner_0"]["Dense_0"]["kernel"], outer["Inner_0/Dense_0/kernel/scale"]),
        params["Inner_0"]["WeightNorm_0"]["Dense_0/kernel/scale"],
    )
    assert_close(folded["params"]["Inner_0"]["Dense_0"]["kernel"], k0)
    assert_close(Top(False).apply(folded, X), Top(True).apply(variables, X))
    # Back: both wrappers of Dense_0 are inverted, the inner one first.
    pretrained = trained(Top(False), X)
    rewrapped = wrap_pretrained(Top(True), pretrained, X, rngs=KEY)
    assert_close(Top(True).apply(rewrapped, X), Top(False).apply(pretrained, X))


class Doubled(Wrapper):
    """A wrapper defined here: fold knows nothing of it but its transform."""

    variable_filter = "kernel"

    def transform(self, leaf):
        return 2.0 * leaf.value


def test_fold_is_generic_over_wrappers():
    wrapped, plain = pair(lambda wrap: wrap(nn.Dense(3)), Doubled)
    variables = wrapped.init(KEY, X)
    folded = fold(wrapped, variables, X)
    kernel = variables["params"]["Dense_0"]["kernel"]
    assert_close(folded["params"]["Dense_0"]["kernel"], 2.0 * kernel)
    assert_close(plain.apply(folded, X), wrapped.apply(variables, X))


def test_fold_takes_shape_dtype_struct_inputs():
    model = WeightNorm(nn.Dense(3))
    variables = randomised(model.init(KEY, X))
    abstract = jax.ShapeDtypeStruct(X.shape, X.dtype)
    chex.assert_trees_all_equal(fold(model, variables, abstract), fold(model, variables, X))


def test_fold_keeps_the_partitioning_of_a_boxed_kernel():
    init = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    model = WeightNorm(nn.Dense(3, kernel_init=init))
    folded = fold(model, model.init(KEY, X), X)
    kernel = folded["params"]["kernel"]
    assert isinstance(kernel, nn.Partitioned) and kernel.names == ("embed", "mlp")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_fold_casts_the_effective_weight_once(variant, dtype):
    """The folded kernel is the normalised one computed in float32, cast once to the dtype."""
    wrapped = WeightNorm(nn.Dense(3, param_dtype=dtype, dtype=dtype))
    plain = nn.Dense(3, param_dtype=dtype, dtype=dtype)
    variables = randomised(wrapped.init(KEY, X.astype(dtype)))
    folded = variant(lambda v: fold(wrapped, v, X.astype(dtype)))(variables)
    kernel = folded["params"]["kernel"]
    assert kernel.dtype == jnp.dtype(dtype)
    params = variables["params"]
    exact = normalised(
        params["layer_instance"]["kernel"].astype(jnp.float32),
        params["layer_instance/kernel/scale"],
    )
    eps = float(jnp.finfo(dtype).eps)
    # One rounding of the float64 value (the float32 computation adds ~1e-7 to it).
    np.testing.assert_allclose(np.asarray(kernel, np.float64), exact, rtol=eps / 2 + 1e-6)
    x = X.astype(dtype)
    assert_close(
        plain.apply(folded, x).astype(jnp.float32),
        wrapped.apply(variables, x).astype(jnp.float32),
        rtol=4 * eps,
        atol=4 * eps,
    )


def test_fold_names_missing_and_extra_variables():
    wrapped, plain = pair(lambda wrap: wrap(nn.Dense(3)))
    plain_variables = plain.init(KEY, X)
    with pytest.raises(
        ValueError,
        match=r"fold\(Top\): the variables do not fit the model: missing "
        r"params/WeightNorm_0/Dense_0/kernel/scale \(3,\)\. Pass the variables of this model",
    ):
        fold(wrapped, plain_variables, X)
    variables = wrapped.init(KEY, X)
    variables["params"]["Dense_7"] = {"bias": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"not in the model: params/Dense_7/bias \(3,\)"):
        fold(wrapped, variables, X)


def test_fold_needs_concrete_variables():
    model = WeightNorm(nn.Dense(3))
    abstract = jax.eval_shape(model.init, KEY, X)
    with pytest.raises(
        TypeError, match=r"the variables must be arrays, got 3 jax.ShapeDtypeStruct"
    ):
        fold(model, abstract, X)


def test_fold_refuses_flax_wrappers_it_cannot_see():
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.WeightNorm(nn.Dense(3))(x)

    with pytest.raises(
        ValueError, match=r"params/WeightNorm_0/Dense_0/kernel/scale look like a wrapper"
    ):
        fold(Top(), Top().init(KEY, X), X)


class _LiftedLayer(nn.Module):
    """A WeightNorm'd Dense, then a LoRA'd one; ``wrap=False`` is the plain twin."""

    wrap: bool

    @nn.compact
    def __call__(self, carry, _):
        first, second = nn.Dense(4), nn.Dense(4)
        if self.wrap:
            first = WeightNorm(first)
            second = LoRA(second, rank=2, b_init=nn.initializers.normal(1.0))
        return second(nn.tanh(first(carry))), None


class _Lifted(nn.Module):
    wrap: bool
    lift: str

    @nn.compact
    def __call__(self, x):
        if self.lift == "scan":
            layers = nn.scan(
                _LiftedLayer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
            )
            return layers(self.wrap)(x, None)[0]
        if self.lift == "vmap":
            experts = nn.vmap(
                _LiftedLayer, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0
            )
            return experts(self.wrap)(x, None)[0]
        block = (nn.remat if self.lift == "remat" else nn.jit)(_LiftedLayer)(self.wrap)
        return block(block(x, None)[0], None)[0]


LIFTS = ["scan", "vmap", "remat", "jit"]


@pytest.mark.parametrize("lift", LIFTS)
def test_fold_reads_weights_out_of_lifted_transforms(lift):
    """nn.scan/nn.vmap stack the folded weights per slice; nn.remat/nn.jit pass them out."""
    wrapped, plain = _Lifted(True, lift), _Lifted(False, lift)
    x = jax.random.normal(jax.random.key(1), (3, 4))
    variables = wrapped.init(KEY, x)
    folded = fold(wrapped, variables, x)
    assert shapes(folded) == shapes(plain.init(KEY, x))
    assert_close(plain.apply(folded, x), wrapped.apply(variables, x))
    # The first kernel of each slice, normalised by hand.
    root = next(iter(variables["params"]))
    params = variables["params"][root]
    stacked = lift in ("scan", "vmap")
    v, g = params["Dense_0"]["kernel"], params["WeightNorm_0"]["Dense_0/kernel/scale"]
    axis = 1 if stacked else 0
    expected = (
        g[..., None, :] * v / np.linalg.norm(np.asarray(v, np.float64), axis=axis, keepdims=True)
    )
    assert_close(folded["params"][root]["Dense_0"]["kernel"], expected)


@pytest.mark.parametrize("lift", LIFTS)
def test_wrap_pretrained_inverts_slice_by_slice_in_lifted_transforms(lift):
    wrapped, plain = _Lifted(True, lift), _Lifted(False, lift)
    x = jax.random.normal(jax.random.key(1), (3, 4))
    pretrained = trained(plain, x)
    variables = wrap_pretrained(wrapped, pretrained, x, rngs=KEY)
    assert_close(wrapped.apply(variables, x), plain.apply(pretrained, x))
    root = next(iter(variables["params"]))
    assert not np.any(np.asarray(variables["params"][root]["LoRA_0"]["Dense_1/kernel/lora_b"]))


@pytest.mark.parametrize("lift", ["scan", "remat"])
def test_init_from_data_inside_lifted_transforms_normalises_every_layer(lift):
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, carry, _):
            return nn.tanh(WeightNorm(nn.Dense(6))(carry)), None

    class Deep(nn.Module):
        @nn.compact
        def __call__(self, x):
            if lift == "scan":
                return nn.scan(
                    Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
                )()(x, None)[0]
            block = nn.remat(Layer)()
            return block(x, None)[0]

    x = jax.random.normal(jax.random.key(1), (128, 6))
    model = Deep()
    variables = init_from_data(model, model.init(KEY, x), x)
    # Unrolled by hand: each slice's layer on the previous one's output.
    root = next(iter(variables["params"]))
    params = variables["params"][root]
    h = x
    for i in range(3 if lift == "scan" else 1):
        layer = jax.tree_util.tree_map(lambda p, i=i: p[i] if lift == "scan" else p, params)
        v, b = layer["Dense_0"]["kernel"], layer["Dense_0"]["bias"]
        g = layer["WeightNorm_0"]["Dense_0/kernel/scale"]
        y = h @ (g * v / jnp.linalg.norm(v, axis=0, keepdims=True)) + b
        np.testing.assert_allclose(np.asarray(y.mean(0)), 0, atol=1e-4)
        np.testing.assert_allclose(np.asarray(y.std(0)), 1, atol=1e-3)
        h = jnp.tanh(y)


# -- wrap_pretrained ----------------------------------------------------------------------


def trained(model, *args, seed=3):
    """Variables of a plain model, different from any init the test makes."""
    return model.init(jax.random.key(seed), *args)


def test_wrap_pretrained_weight_norm_keeps_v_and_takes_its_norm_as_scale(variant):
    wrapped, plain = pair(two_layers)
    pretrained = trained(plain, X)
    variables = variant(lambda p: wrap_pretrained(wrapped, p, X, rngs=KEY, exact=False))(pretrained)
    assert shapes(variables) == shapes(wrapped.init(KEY, X))
    kernel = np.asarray(pretrained["params"]["Dense_0"]["kernel"], np.float64)
    chex.assert_trees_all_equal(variables["params"]["Dense_0"], pretrained["params"]["Dense_0"])
    assert_close(
        variables["params"]["WeightNorm_0"]["Dense_0/kernel/scale"],
        np.sqrt((kernel**2).sum(axis=0)),
    )
    assert_close(wrapped.apply(variables, X), plain.apply(pretrained, X))


def test_wrap_pretrained_into_setup_and_top_level_wrappers():
    pretrained = trained(SetupTop(False), X)
    variables = wrap_pretrained(SetupTop(True), pretrained, X, rngs=KEY)
    fc = variables["params"]["fc"]
    chex.assert_trees_all_equal(fc["layer_instance"], pretrained["params"]["fc"])
    assert_close(SetupTop(True).apply(variables, X), SetupTop(False).apply(pretrained, X))

    pretrained = trained(nn.Dense(3), X)
    variables = wrap_pretrained(WeightNorm(nn.Dense(3)), pretrained, X, rngs=KEY)
    chex.assert_trees_all_equal(variables["params"]["layer_instance"], pretrained["params"])
    assert_close(WeightNorm(nn.Dense(3)).apply(variables, X), nn.Dense(3).apply(pretrained, X))


def test_fold_undoes_wrap_pretrained():
    wrapped, plain = pair(
        lambda wrap: nn.Sequential([wrap(nn.Dense(4)), nn.relu, wrap(nn.Dense(2))])
    )
    pretrained = trained(plain, X)
    variables = wrap_pretrained(wrapped, pretrained, X, rngs=KEY)
    assert_close(fold(wrapped, variables, X), pretrained)


def test_wrap_pretrained_spectral_norm_needs_sigma_one_to_be_exact():
    wrapped = SpectralNorm(nn.Dense(3))
    pretrained = trained(nn.Dense(3), X)
    sigma = np.linalg.svd(np.asarray(pretrained["params"]["kernel"]), compute_uv=False)[0]
    message = (
        r"wrap_pretrained\(SpectralNorm\): with exact=True the wrapped model must see every "
        r"pretrained weight unchanged, but it would change:\n  - params/kernel \(through "
        r"SpectralNorm\(layer_instance\)\) would be off by up to .* of its largest magnitude "
        rf"\(norm ratio {1 / sigma:.4g}\)\. SpectralNorm\(layer_instance\) divides the weight by "
        r"its largest singular value \(the norm ratio is 1 / sigma\), so it reproduces only "
        r"weights whose largest singular value is 1\.\n"
        r"Pass exact=False to accept"
    )
    with pytest.raises(ValueError, match=message):
        wrap_pretrained(wrapped, pretrained, X, rngs=KEY, update_stats=False)


def test_wrap_pretrained_spectral_norm_stores_the_top_singular_pair(variant):
    wrapped = SpectralNorm(nn.Dense(3), n_steps=1)
    pretrained = trained(nn.Dense(3), X)
    variables = variant(
        lambda p: wrap_pretrained(wrapped, p, X, rngs=KEY, exact=False, update_stats=False)
    )(pretrained)
    kernel = np.asarray(pretrained["params"]["kernel"], np.float64)
    _, singular_values, vh = np.linalg.svd(kernel)
    stats = variables["batch_stats"]
    np.testing.assert_allclose(stats["layer_instance/kernel/sigma"], singular_values[0], rtol=1e-5)
    u = np.asarray(stats["layer_instance/kernel/u"], np.float64)
    np.testing.assert_allclose(abs(float((u @ vh[0])[0])), 1.0, rtol=1e-5)
    chex.assert_trees_all_equal(variables["params"]["layer_instance"], pretrained["params"])
    # The wrapped model sees W / sigma(W) from the first call: u is already converged.
    rescaled = {"params": {**pretrained["params"], "kernel": kernel / singular_values[0]}}
    assert_close(wrapped.apply(variables, X, update_stats=False), nn.Dense(3).apply(rescaled, X))


def test_wrap_pretrained_spectral_norm_of_a_unit_sigma_weight_is_exact():
    wrapped = SpectralNorm(nn.Dense(3))
    pretrained = trained(nn.Dense(3), X)
    kernel = np.asarray(pretrained["params"]["kernel"], np.float64)
    pretrained["params"]["kernel"] = jnp.asarray(
        kernel / np.linalg.svd(kernel, compute_uv=False)[0]
    )
    variables = wrap_pretrained(wrapped, pretrained, X, rngs=KEY, update_stats=False)
    assert_close(wrapped.apply(variables, X, update_stats=False), nn.Dense(3).apply(pretrained, X))


def test_wrap_pretrained_a_stack_is_exact_where_the_whole_stack_is():
    """WeightNorm after SpectralNorm undoes its rescaling: the stack reproduces any W."""
    wrapped = WeightNorm(SpectralNorm(nn.Dense(3)))
    pretrained = trained(nn.Dense(3), X)
    variables = wrap_pretrained(wrapped, pretrained, X, rngs=KEY, update_stats=False)
    assert_close(wrapped.apply(variables, X, update_stats=False), nn.Dense(3).apply(pretrained, X))


def test_wrap_pretrained_copies_statistics_and_tied_weights():
    tokens = jnp.array([[1, 2, 3], [4, 5, 10]])
    pretrained = trained(TiedLM(False), tokens)
    variables = wrap_pretrained(TiedLM(True), pretrained, tokens, rngs=KEY)
    assert_close(TiedLM(True).apply(variables, tokens), TiedLM(False).apply(pretrained, tokens))

    def block():
        return nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=True), nn.Dense(2)])

    pretrained = trained(block(), X)
    pretrained["batch_stats"] = jax.tree_util.tree_map(lambda s: s + 0.3, pretrained["batch_stats"])
    variables = wrap_pretrained(WeightNorm(block()), pretrained, X, rngs=KEY)
    chex.assert_trees_all_equal(
        variables["batch_stats"]["layer_instance"], pretrained["batch_stats"]
    )
    assert_close(WeightNorm(block()).apply(variables, X), block().apply(pretrained, X))


def test_wrap_pretrained_weight_norm_without_scale_reproduces_only_unit_norms():
    wrapped = WeightNorm(nn.Dense(3), use_scale=False)
    pretrained = trained(nn.Dense(3), X)
    with pytest.raises(
        ValueError,
        match=r"has use_scale=False: it reproduces only weights of unit norm over the axes \(0,\)",
    ):
        wrap_pretrained(wrapped, pretrained, X, rngs=KEY)
    kernel = np.asarray(pretrained["params"]["kernel"], np.float64)
    unit = {"params": {**pretrained["params"], "kernel": jnp.asarray(normalised(kernel, 1.0))}}
    variables = wrap_pretrained(wrapped, unit, X, rngs=KEY)
    assert_close(wrapped.apply(variables, X), nn.Dense(3).apply(unit, X))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_wrap_pretrained_in_low_precision(dtype):
    plain = nn.Dense(3, param_dtype=dtype, dtype=dtype)
    wrapped = WeightNorm(nn.Dense(3, param_dtype=dtype, dtype=dtype))
    x = X.astype(dtype)
    pretrained = trained(plain, x)
    variables = wrap_pretrained(wrapped, pretrained, x, rngs=KEY)
    chex.assert_trees_all_equal(variables["params"]["layer_instance"], pretrained["params"])
    eps = float(jnp.finfo(dtype).eps)
    assert_close(
        wrapped.apply(variables, x).astype(jnp.float32),
        plain.apply(pretrained, x).astype(jnp.float32),
        rtol=4 * eps,
        atol=4 * eps,
    )


def test_wrap_pretrained_names_what_does_not_fit():
    wrapped = WeightNorm(nn.Dense(3))
    with pytest.raises(
        ValueError,
        match=r"wrap_pretrained\(WeightNorm\): the pretrained variables do not fit WeightNorm "
        r"without its wrappers: missing params/bias \(3,\), params/kernel \(4, 3\); not in the "
        r"model: params/Dense_0/bias \(3,\), params/Dense_0/kernel \(4, 3\)\. Pass the variables "
        r"of the same model built without the wrappers",
    ):
        wrap_pretrained(
            wrapped, {"params": {"Dense_0": trained(nn.Dense(3), X)["params"]}}, X, rngs=KEY
        )
    misshapen = trained(nn.Dense(3), X)
    misshapen["params"]["kernel"] = jnp.zeros((4, 5))
    with pytest.raises(
        ValueError, match=r"wrong shapes: params/kernel is \(4, 5\), expected \(4, 3\)\."
    ):
        wrap_pretrained(wrapped, misshapen, X, rngs=KEY)


def test_wrap_pretrained_refuses_a_wrapper_without_invert():
    with pytest.raises(
        TypeError,
        match=r"wrap_pretrained\(Doubled\): Doubled\(layer_instance\) at the top: Doubled "
        r"defines no invert\(leaf\), so its transform cannot be inverted\.",
    ):
        wrap_pretrained(Doubled(nn.Dense(3)), trained(nn.Dense(3), X), X, rngs=KEY)


def test_a_wrapper_becomes_invertible_with_a_few_lines():
    class Halved(Doubled):
        def invert(self, leaf):
            return Inverse(leaf.value / 2.0)

    pretrained = trained(nn.Dense(3), X)
    variables = wrap_pretrained(Halved(nn.Dense(3)), pretrained, X, rngs=KEY)
    assert_close(Halved(nn.Dense(3)).apply(variables, X), nn.Dense(3).apply(pretrained, X))


def test_a_wrong_invert_is_caught_by_the_exact_check():
    class Wrong(Doubled):
        def invert(self, leaf):
            return Inverse(leaf.value)

    with pytest.raises(
        ValueError,
        match=r"params/kernel \(through Wrong\(layer_instance\)\) would be off by up to 1 of "
        r"its largest magnitude \(norm ratio 2\)\.\n",
    ):
        wrap_pretrained(Wrong(nn.Dense(3)), trained(nn.Dense(3), X), X, rngs=KEY)


def test_an_invert_returning_a_variable_the_wrapper_lacks_is_named():
    class Stray(Doubled):
        def invert(self, leaf):
            return Inverse(leaf.value / 2.0, {"params": {f"{leaf.path}/gain": 1.0}})

    with pytest.raises(
        ValueError,
        match=r"Stray\(layer_instance\)\.invert returned the variable "
        r"params/layer_instance/kernel/gain, which it does not have \(it has none\)\.",
    ):
        wrap_pretrained(Stray(nn.Dense(3)), trained(nn.Dense(3), X), X, rngs=KEY)


def test_wrap_pretrained_checks_only_outside_jit():
    with pytest.raises(
        ValueError,
        match=r"exact=True checks the result against the pretrained values, which needs "
        r"them as arrays, not traced under jax.jit",
    ):
        jax.jit(lambda p: wrap_pretrained(WeightNorm(nn.Dense(3)), p, X, rngs=KEY))(
            trained(nn.Dense(3), X)
        )


# -- init_from_data -----------------------------------------------------------------------

BATCH = jax.random.normal(jax.random.key(2), (256, 6)) * 3.0 + 1.0
IMAGES = jax.random.normal(jax.random.key(2), (16, 8, 8, 3)) * 2.0 - 0.5


class MLP(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for features in (8, 8):
            dense = nn.Dense(features, dtype=self.dtype, param_dtype=self.dtype)
            x = nn.relu(WeightNorm(dense)(x))
        return WeightNorm(nn.Dense(3, dtype=self.dtype, param_dtype=self.dtype))(x)


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(WeightNorm(nn.Conv(8, (3, 3)))(x))
        x = nn.relu(WeightNorm(nn.Conv(4, (3, 3), strides=2))(x))
        return WeightNorm(nn.Dense(2))(x.reshape(x.shape[0], -1))


def layer_outputs(model, variables, *args):
    """Each WeightNorm's output (the wrapped layer's pre-activation), in call order."""
    outputs = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if isinstance(context.module, WeightNorm):
            outputs.append(np.asarray(out, np.float64))
        return out

    with nn.intercept_methods(record):
        model.apply(variables, *args)
    return outputs


def by_hand_mlp(params, x, epsilon=1e-5):
    """Salimans & Kingma 3.1 in numpy, layer by layer, from scales of one and zero biases."""
    scales, biases = [], []
    x = np.asarray(x, np.float64)
    for index in range(3):
        kernel = np.asarray(params[f"Dense_{index}"]["kernel"], np.float64)
        t = x @ normalised(kernel, 1.0)
        mean, std = t.mean(axis=0), np.sqrt(t.var(axis=0) + epsilon)
        scales.append(1.0 / std)
        biases.append(-mean / std)
        x = (t - mean) / std
        x = np.maximum(x, 0.0) if index < 2 else x
    return scales, biases


def test_init_from_data_an_mlp_by_hand(variant):
    variables = MLP().init(KEY, BATCH)
    initialised = variant(lambda v: init_from_data(MLP(), v, BATCH))(variables)
    scales, biases = by_hand_mlp(variables["params"], BATCH)
    for index in range(3):
        params = initialised["params"]
        np.testing.assert_allclose(
            params[f"WeightNorm_{index}"][f"Dense_{index}/kernel/scale"], scales[index], rtol=1e-4
        )
        np.testing.assert_allclose(
            params[f"Dense_{index}"]["bias"], biases[index], rtol=1e-4, atol=1e-5
        )
        chex.assert_trees_all_equal(
            params[f"Dense_{index}"]["kernel"], variables["params"][f"Dense_{index}"]["kernel"]
        )
    for out in layer_outputs(MLP(), initialised, BATCH):
        np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-4)
        np.testing.assert_allclose(out.std(axis=0), 1.0, atol=1e-4)


def test_init_from_data_a_cnn_normalises_each_channel_over_batch_and_space(variant):
    variables = randomised(CNN().init(KEY, IMAGES))  # from any scale, not only ones
    initialised = variant(lambda v: init_from_data(CNN(), v, IMAGES))(variables)
    outputs = layer_outputs(CNN(), initialised, IMAGES)
    assert [out.shape for out in outputs] == [(16, 8, 8, 8), (16, 4, 4, 4), (16, 2)]
    for out in outputs:
        axes = tuple(range(out.ndim - 1))
        np.testing.assert_allclose(out.mean(axis=axes), 0.0, atol=1e-4)
        np.testing.assert_allclose(out.std(axis=axes), 1.0, atol=1e-4)


def test_init_from_data_in_bfloat16():
    model = MLP(jnp.bfloat16)
    batch = BATCH.astype(jnp.bfloat16)
    initialised = init_from_data(model, model.init(KEY, batch), batch)
    for out in layer_outputs(model, initialised, batch):
        np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=0.05)
        np.testing.assert_allclose(out.std(axis=0), 1.0, atol=0.05)


def test_init_from_data_through_a_stack():
    model = WeightNorm(SpectralNorm(nn.Dense(4)))
    variables = model.init(KEY, BATCH, update_stats=False)
    initialised = init_from_data(model, variables, BATCH, update_stats=False)
    out = np.asarray(model.apply(initialised, BATCH, update_stats=False), np.float64)
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=0), 1.0, atol=1e-4)


def test_init_from_data_lists_every_layer_it_cannot_initialise():
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = WeightNorm(nn.Dense(4, use_bias=False))(x)
            return WeightNorm(nn.Dense(3), use_scale=False)(x)

    message = (
        r"init_from_data\(Top\) has 2 problems:\n"
        r"  - WeightNorm\(Dense_1\) at 'WeightNorm_1' has use_scale=False; the data-dependent "
        r"init sets each scale\. Build it with use_scale=True\.\n"
        r"  - WeightNorm\(Dense_0\) at 'WeightNorm_0': Dense_0 has no bias \(expected "
        r"params/Dense_0/bias of shape \(4,\)\); the data-dependent init sets it to -mean / "
        r"std\. Build the layer with use_bias=True\.$"
    )
    with pytest.raises(ValueError, match=message):
        init_from_data(Top(), Top().init(KEY, BATCH), BATCH)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            WeightNorm(nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(3)])),
            r"WeightNorm\(layer_instance\) at the top normalises 2 variables "
            r"\(params/layer_instance/layers_0/kernel, params/layer_instance/layers_2/kernel\); "
            r"the data-dependent init needs one kernel per WeightNorm\.",
        ),
        (
            SpectralNorm(WeightNorm(nn.Dense(3))),
            r"WeightNorm\(layer_instance\) at 'layer_instance': SpectralNorm\(layer_instance\) "
            r"transforms "
            r"params/layer_instance/layer_instance/kernel after WeightNorm, so the scale no "
            r"longer sets the output's scale\. Put WeightNorm outermost: "
            r"WeightNorm\(SpectralNorm\(\.\.\.\)\)\.",
        ),
        (
            WeightNorm(nn.Dense(3, kernel_init=nn.initializers.lecun_normal()), feature_axes=0),
            r"expected one scale and one bias per output feature \(the last axis of the output, "
            r"3\), got a scale of shape \(6,\) and a bias of shape \(3,\)",
        ),
    ],
    ids=["block", "not-outermost", "feature-axes"],
)
def test_init_from_data_says_what_each_weight_norm_must_be(model, message):
    kwargs = {"update_stats": False} if isinstance(model, SpectralNorm) else {}
    with pytest.raises(ValueError, match=message):
        init_from_data(model, model.init(KEY, BATCH, **kwargs), BATCH, **kwargs)


def test_init_from_data_needs_a_weight_norm():
    with pytest.raises(
        ValueError,
        match=re.escape("init_from_data(Dense): the call (__call__) ran no wrapkit WeightNorm"),
    ):
        init_from_data(nn.Dense(3), nn.Dense(3).init(KEY, BATCH), BATCH)


def test_init_from_data_needs_a_batch_of_values():
    abstract = jax.ShapeDtypeStruct(BATCH.shape, BATCH.dtype)
    model = WeightNorm(nn.Dense(3))
    with pytest.raises(
        TypeError,
        match=re.escape(
            "init_from_data(WeightNorm): the batch must be arrays, got 1 jax.ShapeDtypeStruct"
        ),
    ):
        init_from_data(model, model.init(KEY, BATCH), abstract)


def test_fold_inside_a_scan_that_broadcasts_its_parameters():
    """A weight-tied recurrence (variable_broadcast="params"): one folded kernel."""

    class Cell(nn.Module):
        wrap: bool

        @nn.compact
        def __call__(self, carry, _):
            dense = nn.Dense(4)
            return nn.tanh((WeightNorm(dense) if self.wrap else dense)(carry)), None

    class Recurrent(nn.Module):
        wrap: bool

        @nn.compact
        def __call__(self, x):
            cells = nn.scan(
                Cell, variable_broadcast="params", split_rngs={"params": False}, length=3
            )
            return cells(self.wrap)(x, None)[0]

    variables = randomised(Recurrent(True).init(KEY, X))
    folded = fold(Recurrent(True), variables, X)
    assert shapes(folded) == shapes(Recurrent(False).init(KEY, X))
    params = variables["params"]["ScanCell_0"]
    expected = normalised(
        params["Dense_0"]["kernel"], params["WeightNorm_0"]["Dense_0/kernel/scale"]
    )
    assert_close(folded["params"]["ScanCell_0"]["Dense_0"]["kernel"], expected)
    assert_close(Recurrent(False).apply(folded, X), Recurrent(True).apply(variables, X))
