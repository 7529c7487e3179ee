"""wrapkit.nnx.SpectralNorm: parity with flax's NNX and wrapkit's Linen classes, flax's
failures it fixes, train/eval, the GAN discriminator's gradients, low precision, errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import wrapkit.linen
from wrapkit.nnx import Leaf, SpectralNorm, WeightNorm

X = jax.random.normal(jax.random.key(1), (2, 3))
IMAGES = jax.random.normal(jax.random.key(2), (2, 5, 5, 2))
SETTINGS = settings(max_examples=4, deadline=None, database=None, print_blob=True)


@pytest.fixture(params=[lambda f: f, nnx.jit], ids=["eager", "jit"])
def variant(request):
    return request.param


def linear(seed=0, **kwargs):
    return nnx.Linear(3, 4, rngs=nnx.Rngs(seed), **kwargs)


def conv(seed=0):
    return nnx.Conv(2, 3, (3, 3), rngs=nnx.Rngs(seed))


def mlp(seed=0):
    rngs = nnx.Rngs(seed)
    return nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), jax.nn.relu, nnx.Linear(4, 2, rngs=rngs))


LAYERS = pytest.mark.parametrize(
    ("layer", "x"), [(linear, X), (conv, IMAGES), (mlp, X)], ids=["Linear", "Conv", "MLP"]
)


def snapshot(tree):
    return jax.tree.map(np.array, tree)


def ours_stats(model):
    """{(path, "u" | "sigma"): value}, keyed as ``flax_stats`` keys flax's statistics."""
    return {
        (path, name): np.array(getattr(model, name)[path][...])
        for path in model.__dict__.get("u", {})
        for name in ("u", "sigma")
    }


def flax_stats(model):
    return {
        ("/".join(map(str, keys[:-1])), keys[-1]): np.array(stat[...])
        for keys, stat in model.batch_stats.items()
    }


def assert_stats_close(ours, theirs, rtol=1e-6, atol=1e-7):
    assert ours.keys() == theirs.keys()
    for path in ours:
        np.testing.assert_allclose(ours[path], theirs[path], rtol=rtol, atol=atol, err_msg=path)


def call(variant, **kwargs):
    return variant(lambda model, x: model(x, **kwargs))


# -- parity with flax.nnx.SpectralNorm -----------------------------------------------------


@LAYERS
def test_the_same_rngs_give_flaxs_u(layer, x):
    ours = SpectralNorm(layer(), rngs=nnx.Rngs(1))
    theirs = nnx.SpectralNorm(layer(), rngs=nnx.Rngs(1))
    # Both draw the same keys from the same normal initialiser: equal by construction.
    ours, theirs = ours_stats(ours), flax_stats(theirs)
    assert ours.keys() == theirs.keys()
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


@LAYERS
@pytest.mark.parametrize("update_stats", [True, False], ids=["update", "frozen"])
def test_one_forward_gives_flaxs_output_and_statistics(variant, layer, x, update_stats):
    ours = SpectralNorm(layer(), rngs=nnx.Rngs(1))
    theirs = nnx.SpectralNorm(layer(), rngs=nnx.Rngs(1))
    before = ours_stats(ours)
    y = call(variant, update_stats=update_stats)(ours, x)
    expected = call(variant, update_stats=update_stats)(theirs, x)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    assert_stats_close(ours_stats(ours), flax_stats(theirs))
    if not update_stats:
        jax.tree.map(np.testing.assert_array_equal, ours_stats(ours), before)


@SETTINGS
@given(
    features_in=st.integers(1, 5),
    features_out=st.integers(1, 5),
    n_steps=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_flax_parity_on_random_shapes(features_in, features_out, n_steps, seed):
    def make():
        return nnx.Linear(features_in, features_out, rngs=nnx.Rngs(seed))

    x = jax.random.normal(jax.random.key(seed), (2, features_in))
    ours = SpectralNorm(make(), n_steps=n_steps, rngs=nnx.Rngs(seed + 1))
    theirs = nnx.SpectralNorm(make(), n_steps=n_steps, rngs=nnx.Rngs(seed + 1))
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    assert_stats_close(ours_stats(ours), flax_stats(theirs), rtol=1e-5, atol=1e-6)


# -- parity with wrapkit.linen.SpectralNorm ------------------------------------------------


@pytest.mark.parametrize("n_steps", [1, 3])
@pytest.mark.parametrize("update_stats", [True, False], ids=["update", "frozen"])
def test_linen_parity_from_the_same_variables(variant, n_steps, update_stats):
    ours = SpectralNorm(linear(), n_steps=n_steps, rngs=nnx.Rngs(1))
    kernel, bias = ours.layer_instance.kernel[...], ours.layer_instance.bias[...]
    variables = {
        "params": {"layer_instance": {"kernel": kernel, "bias": bias}},
        "batch_stats": {
            "layer_instance/kernel/u": ours.u["kernel"][...],
            "layer_instance/kernel/sigma": ours.sigma["kernel"][...],
        },
    }
    linen = wrapkit.linen.SpectralNorm(nn.Dense(4), n_steps=n_steps)
    expected, updates = linen.apply(
        variables, X, update_stats=update_stats, mutable=["batch_stats"]
    )
    y = call(variant, update_stats=update_stats)(ours, X)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-7)
    stats = updates["batch_stats"]
    np.testing.assert_allclose(ours.u["kernel"][...], stats["layer_instance/kernel/u"], rtol=1e-6)
    np.testing.assert_allclose(
        ours.sigma["kernel"][...], stats["layer_instance/kernel/sigma"], rtol=1e-6
    )


# -- flax's failures -----------------------------------------------------------------------


def test_flax_5576_flax_writes_the_normalised_kernel_and_ours_leaves_it(variant):
    """flax issue 5576: flax's nnx.SpectralNorm stores W / sigma in the Linear's Param on every
    forward, so the next forward normalises a normalised weight and the gradient flows to
    the wrong value."""
    ours = SpectralNorm(linear(), rngs=nnx.Rngs(1))
    theirs = nnx.SpectralNorm(linear(), rngs=nnx.Rngs(1))
    raw = snapshot(nnx.state(ours.layer_instance, nnx.Param))
    forward = call(variant)
    for _ in range(2):
        forward(ours, X)
        forward(theirs, X)
    jax.tree.map(
        np.testing.assert_array_equal, snapshot(nnx.state(ours.layer_instance, nnx.Param)), raw
    )
    assert not np.array_equal(theirs.layer_instance.kernel[...], raw["kernel"][...])


class Scaled(nnx.Module):
    """A module taking a keyword argument: ``deterministic`` halves its output."""

    def __init__(self):
        self.linear = linear()

    def __call__(self, x, *, deterministic=False):
        return self.linear(x) * (1.0 if deterministic else 2.0)


def test_keyword_arguments_reach_the_inner_module_where_flax_drops_them():
    ours = SpectralNorm(Scaled(), rngs=nnx.Rngs(1))
    halved = ours(X, deterministic=True, update_stats=False)
    doubled = ours(X, deterministic=False, update_stats=False)
    np.testing.assert_array_equal(2 * halved, doubled)  # times 2: exact by construction
    theirs = nnx.SpectralNorm(Scaled(), rngs=nnx.Rngs(1))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'deterministic'"):
        theirs(X, deterministic=True)


def attention(deterministic=None):
    return nnx.MultiHeadAttention(
        2,
        4,
        qkv_features=4,
        out_features=4,
        dropout_rate=0.5,
        decode=False,
        deterministic=deterministic,
        rngs=nnx.Rngs(0),
    )


def test_multi_head_attention_gets_its_decode_and_deterministic_keywords():
    x = jax.random.normal(jax.random.key(3), (1, 3, 4))
    ours = SpectralNorm(attention(), rngs=nnx.Rngs(1))
    theirs = nnx.SpectralNorm(attention(deterministic=True), rngs=nnx.Rngs(1))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'decode'"):
        theirs(x, decode=False, deterministic=True)
    y = ours(x, decode=False, deterministic=True)
    np.testing.assert_allclose(y, theirs(x), rtol=1e-5, atol=1e-6)
    assert_stats_close(ours_stats(ours), flax_stats(theirs), rtol=1e-5, atol=1e-6)


# -- train and eval ------------------------------------------------------------------------


def test_eval_stops_the_updates_and_train_resumes_them(variant):
    model = SpectralNorm(linear(), rngs=nnx.Rngs(1))
    forward = call(variant)
    model.eval()
    before = ours_stats(model)
    forward(model, X)
    jax.tree.map(np.testing.assert_array_equal, ours_stats(model), before)
    model.train()
    forward(model, X)
    assert not np.array_equal(ours_stats(model)[("kernel", "u")], before[("kernel", "u")])


def test_a_view_with_use_running_average_does_not_update():
    model = SpectralNorm(linear(), rngs=nnx.Rngs(1))
    before = ours_stats(model)
    view = nnx.view(model, use_running_average=True)
    view(X)
    jax.tree.map(np.testing.assert_array_equal, ours_stats(model), before)
    assert model.use_running_average is False
    model(X)
    assert not np.array_equal(ours_stats(model)[("kernel", "u")], before[("kernel", "u")])


def test_update_stats_of_the_call_overrides_the_mode():
    model = SpectralNorm(linear(), update_stats=False, rngs=nnx.Rngs(1))
    assert model.use_running_average is True
    before = ours_stats(model)
    model(X)
    model(X, update_stats=False)
    jax.tree.map(np.testing.assert_array_equal, ours_stats(model), before)
    model(X, update_stats=True)
    assert not np.array_equal(ours_stats(model)[("kernel", "u")], before[("kernel", "u")])


# -- the GAN discriminator -----------------------------------------------------------------


def l2_normalize(x, eps=1e-12):
    return x * jax.lax.rsqrt((x * x).sum() + eps)


def reference_sn(kernel, u):
    """Miyato et al.'s Algorithm 1, one step, written out: gradients stopped at u and v."""
    v = jax.lax.stop_gradient(l2_normalize(u @ kernel.T))
    u = jax.lax.stop_gradient(l2_normalize(v @ kernel))
    sigma = (v @ kernel @ u.T)[0, 0]
    return kernel / sigma, u, sigma


def reference_discriminator(params, stats, x):
    """A Sequential(SN(Linear), relu, SN(Linear)) as a function; returns the new stats."""
    new = {}
    for i, name in enumerate(("first", "second")):
        kernel, new_u, sigma = reference_sn(params[name]["kernel"], stats[name])
        new[name] = (new_u, sigma)
        x = x @ kernel + params[name]["bias"]
        if i == 0:
            x = jax.nn.relu(x)
    return x, new


def discriminator():
    rngs = nnx.Rngs(0)
    return nnx.Sequential(
        SpectralNorm(nnx.Linear(3, 4, rngs=rngs), rngs=rngs),
        jax.nn.relu,
        SpectralNorm(nnx.Linear(4, 1, rngs=rngs), rngs=rngs),
    )


def gan_loss(model, x1, x2):
    return model(x1).mean() - model(x2).mean()


def test_gan_loss_gradients_and_statistics_match_a_hand_written_reference(variant):
    model = discriminator()
    layers = model.layers[0], model.layers[2]
    params = {
        name: {"kernel": layer.layer_instance.kernel[...], "bias": layer.layer_instance.bias[...]}
        for name, layer in zip(("first", "second"), layers, strict=True)
    }
    u0 = {
        name: layer.u["kernel"][...]
        for name, layer in zip(("first", "second"), layers, strict=True)
    }
    x1, x2 = X, jax.random.normal(jax.random.key(7), (2, 3))

    def reference(params):
        y1, stats1 = reference_discriminator(params, u0, x1)  # advances u ...
        y2, stats2 = reference_discriminator(params, {k: s[0] for k, s in stats1.items()}, x2)
        return y1.mean() - y2.mean(), stats2  # ... which the second call uses

    (expected_loss, expected_stats), expected_grads = jax.value_and_grad(reference, has_aux=True)(
        params
    )

    def run(model):
        return variant(nnx.value_and_grad(gan_loss, argnums=nnx.DiffState(0, nnx.Param)))(
            model, x1, x2
        )

    twin = nnx.clone(model)
    loss, grads = run(model)
    run(twin)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for name, index in (("first", 0), ("second", 2)):
        inner = grads["layers"][index]["layer_instance"]
        for param in ("kernel", "bias"):
            np.testing.assert_allclose(
                inner[param][...], expected_grads[name][param], rtol=1e-5, atol=1e-6
            )
        layer = model.layers[index]
        u, sigma = expected_stats[name]
        np.testing.assert_allclose(layer.u["kernel"][...], u, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.sigma["kernel"][...], sigma, rtol=1e-5)
    # The same program from the same state twice: the statistics are bit-identical.
    jax.tree.map(
        np.testing.assert_array_equal,
        snapshot(nnx.state(model, nnx.BatchStat)),
        snapshot(nnx.state(twin, nnx.BatchStat)),
    )


def test_gradients_reach_the_raw_params_not_the_statistics():
    model = SpectralNorm(linear(), rngs=nnx.Rngs(1))
    grads = nnx.grad(lambda m: m(X).sum())(model)
    assert {keys for keys, _ in nnx.to_flat_state(grads)} == {
        ("layer_instance", "bias"),
        ("layer_instance", "kernel"),
    }


# -- low precision ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("scale", [0.0, 1e-4], ids=["zero", "tiny"])
@pytest.mark.parametrize("param_dtype", ["float32", "low"])
def test_zero_and_tiny_low_precision_kernels_stay_finite(variant, dtype, scale, param_dtype):
    """In float16, 1e-12 and the squares of a 1e-4 kernel underflow: computed in float32."""
    layer = linear(dtype=dtype, param_dtype=dtype)
    layer.kernel[...] = (scale * layer.kernel[...].astype(jnp.float32)).astype(dtype)
    stats_dtype = jnp.float32 if param_dtype == "float32" else dtype
    model = SpectralNorm(layer, param_dtype=stats_dtype, rngs=nnx.Rngs(1))

    def loss(model, x):
        return model(x).astype(jnp.float32).sum()

    value, grads = variant(nnx.value_and_grad(loss))(model, X.astype(dtype))
    assert np.isfinite(value)
    chex.assert_tree_all_finite((snapshot(grads), ours_stats(model)))
    assert model.u["kernel"][...].dtype == model.sigma["kernel"][...].dtype == stats_dtype
    if scale == 0:
        # 0 / 1 and sums of zeros: exact by construction.
        assert float(model.sigma["kernel"][...]) == 0.0


# -- stacks, options, invert ---------------------------------------------------------------


def test_weight_norm_of_spectral_norm_normalises_twice_and_never_selects_u_or_sigma():
    layer = linear(use_bias=False)
    inner = SpectralNorm(layer, rngs=nnx.Rngs(1))
    model = WeightNorm(inner, variable_filter=None)
    assert list(model.scale) == ["kernel"]
    u = inner.u["kernel"][...]
    spectral, new_u, sigma = reference_sn(layer.kernel[...], u)
    expected = X @ (spectral / jnp.linalg.norm(spectral, axis=0))
    np.testing.assert_allclose(model(X), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inner.u["kernel"][...], new_u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inner.sigma["kernel"][...], sigma, rtol=1e-5)
    with pytest.raises(ValueError, match=r"selects none of the Param variables of Linear"):
        WeightNorm(inner, variable_filter=nnx.BatchStat)
    before = ours_stats(inner)
    nnx.view(model, use_running_average=True)(X)
    model.eval()
    model(X)
    jax.tree.map(np.testing.assert_array_equal, ours_stats(inner), before)


def test_vectors_and_n_steps_zero_pass_unchanged():
    model = SpectralNorm(linear(), rngs=nnx.Rngs(1))
    assert list(model.u) == list(model.sigma) == ["kernel"]  # no statistics for the bias
    plain = linear()
    unchanged = SpectralNorm(linear(), n_steps=0, rngs=nnx.Rngs(1))
    assert "u" not in vars(unchanged)
    np.testing.assert_array_equal(unchanged(X), plain(X))


def test_error_on_non_matrix_refuses_a_conv_kernel_when_built():
    with pytest.raises(
        ValueError,
        match=r"^SpectralNorm\(Conv\): 'kernel' has 4 dimensions \(3, 3, 2, 3\), but "
        r"error_on_non_matrix=True\. Pass error_on_non_matrix=False to normalise it as a "
        r"matrix of shape \(-1, 3\)",
    ):
        SpectralNorm(conv(), error_on_non_matrix=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_steps": -1}, r"n_steps must be a non-negative int \(0 disables it\), got -1 \(int\)"),
        ({"n_steps": 1.0}, r"n_steps must be a non-negative int .*got 1\.0 \(float\)"),
        ({"epsilon": -1}, r"epsilon must be a finite non-negative number, got -1\."),
        ({"error_on_non_matrix": "yes"}, r"error_on_non_matrix must be True or False, got 'yes'"),
        ({"dtype": jnp.int32}, r"dtype must be None or a floating-point or complex dtype, got"),
        ({"param_dtype": None}, r"param_dtype must be a floating-point or complex dtype, got"),
        ({"update_stats": "yes"}, r"update_stats must be True or False, got 'yes'\. Pass"),
    ],
    ids=[
        "n_steps-negative",
        "n_steps-float",
        "epsilon",
        "non_matrix",
        "dtype",
        "param_dtype",
        "update_stats",
    ],
)
def test_an_invalid_option_fails_when_built(options, message):
    with pytest.raises(ValueError, match=rf"^SpectralNorm\(Linear\) {message}"):
        SpectralNorm(linear(), **options)


def test_every_invalid_option_is_reported_at_once():
    with pytest.raises(
        ValueError,
        match=r"^SpectralNorm\(Linear\) has 2 problems:\n  - n_steps must be .*\n  - epsilon must",
    ):
        SpectralNorm(linear(), n_steps=-1, epsilon=float("nan"))


def test_invert_gives_the_fixed_point_of_power_iteration():
    model = SpectralNorm(linear(), rngs=nnx.Rngs(1))
    kernel = model.layer_instance.kernel
    inverse = model.invert(Leaf("kernel", ("kernel",), kernel[...], kernel))
    assert inverse.caveat is not None
    model.u["kernel"][...] = inverse.variables["u"]
    model(X)
    exact = np.linalg.svd(np.asarray(kernel[...], np.float64), compute_uv=False)[0]
    np.testing.assert_allclose(float(model.sigma["kernel"][...]), exact, rtol=1e-5)
    np.testing.assert_allclose(float(inverse.variables["sigma"]), exact, rtol=1e-5)
