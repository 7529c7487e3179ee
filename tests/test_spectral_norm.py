"""SpectralNorm beyond flax parity: ground truth, deviations and errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wrapkit.linen import SpectralNorm

X = jax.random.normal(jax.random.key(1), (2, 4))
PARTITIONED_INIT = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))


@pytest.fixture(params=[lambda f: f, jax.jit], ids=["eager", "jit"])
def variant(request):
    return request.param


def wrapped(wrapper_class, layer, **wrapper_kwargs):
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x, update_stats):
            return wrapper_class(layer(), **wrapper_kwargs)(x, update_stats=update_stats)

    return Top()


def test_sigma_converges_to_the_largest_singular_value(variant):
    model = wrapped(SpectralNorm, lambda: nn.Dense(3), n_steps=5)
    variables = model.init(jax.random.key(0), X, False)
    step = variant(lambda v: model.apply(v, X, True, mutable=["batch_stats"])[1])
    for _ in range(10):
        variables = {**variables, **step(variables)}
    kernel = np.asarray(variables["params"]["Dense_0"]["kernel"])
    sigma = variables["batch_stats"]["SpectralNorm_0"]["Dense_0/kernel/sigma"]
    np.testing.assert_allclose(sigma, np.linalg.svd(kernel, compute_uv=False)[0], rtol=1e-5)
    # The layer then sees a kernel of spectral norm one.
    y = model.apply(variables, X, False)
    bias = variables["params"]["Dense_0"]["bias"]
    chex.assert_trees_all_close(y, X @ (kernel / sigma) + bias, rtol=1e-5)


def test_update_stats_false_leaves_the_statistics_unchanged():
    model = wrapped(SpectralNorm, lambda: nn.Dense(3))
    variables = model.init(jax.random.key(0), X, False)
    _, updates = model.apply(variables, X, False, mutable=["batch_stats"])
    # Exact: the stored values come back untouched; nothing is computed from them.
    chex.assert_trees_all_equal(updates["batch_stats"], variables["batch_stats"])


def test_partitioned_kernel_is_accepted(variant):
    plain = wrapped(SpectralNorm, lambda: nn.Dense(3))
    boxed = wrapped(SpectralNorm, lambda: nn.Dense(3, kernel_init=PARTITIONED_INIT))
    variables = boxed.init(jax.random.key(0), X, True)
    assert isinstance(variables["params"]["Dense_0"]["kernel"], nn.Partitioned)
    unboxed = nn.unbox(variables)
    y, stats = variant(lambda v: boxed.apply(v, X, True, mutable=["batch_stats"]))(variables)
    y_ref, stats_ref = plain.apply(unboxed, X, True, mutable=["batch_stats"])
    chex.assert_trees_all_close((y, stats), (y_ref, stats_ref), rtol=1e-6)


def test_flax_crashes_on_a_partitioned_kernel():
    """Regression: flax's SpectralNorm reads dict keys of a path through Partitioned.value."""
    model = wrapped(nn.SpectralNorm, lambda: nn.Dense(3, kernel_init=PARTITIONED_INIT))
    with pytest.raises(AttributeError, match="GetAttrKey"):
        model.init(jax.random.key(0), X, True)


LOW_PRECISION = [jnp.float16, jnp.bfloat16]
LOW_PRECISION_IDS = ["float16", "bfloat16"]


def tolerance(dtype):
    """A few roundings of ``dtype``: what one cast of a float32 result costs."""
    return 4 * float(jnp.finfo(dtype).eps)


def low_precision_dense(dtype):
    model = wrapped(
        SpectralNorm, lambda: nn.Dense(3, dtype=dtype, param_dtype=dtype), param_dtype=dtype
    )
    return model, model.init(jax.random.key(0), X, False)


def with_kernel(variables, kernel):
    params = {**variables["params"], "Dense_0": {**variables["params"]["Dense_0"]}}
    params["Dense_0"]["kernel"] = kernel
    return {**variables, "params": params}


@pytest.mark.parametrize(
    "dtype", [jnp.float32, *LOW_PRECISION], ids=["float32", *LOW_PRECISION_IDS]
)
@pytest.mark.parametrize("scale", [0.0, 1e-4], ids=["zero", "tiny"])
def test_zero_and_tiny_weights_give_finite_outputs_gradients_and_statistics(variant, dtype, scale):
    """In float16, 1e-12 and the squares of a 1e-4 kernel underflow: computed in float32."""
    model, variables = low_precision_dense(dtype)
    kernel = variables["params"]["Dense_0"]["kernel"].astype(jnp.float32)
    variables = with_kernel(variables, (scale * kernel).astype(dtype))

    def loss(params):
        y, updates = model.apply({**variables, "params": params}, X, True, mutable=["batch_stats"])
        return y.astype(jnp.float32).sum(), updates

    (value, updates), grads = variant(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    assert np.isfinite(value)
    chex.assert_tree_all_finite((grads, updates))
    stats = updates["batch_stats"]["SpectralNorm_0"]
    assert stats["Dense_0/kernel/u"].dtype == stats["Dense_0/kernel/sigma"].dtype == dtype
    if scale == 0:
        # 0 / 1 and sums of zeros: exact by construction.
        assert float(stats["Dense_0/kernel/sigma"]) == 0.0


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=LOW_PRECISION_IDS)
def test_sigma_of_a_tiny_low_precision_kernel_converges(variant, dtype):
    model, variables = low_precision_dense(dtype)
    kernel = (1e-4 * variables["params"]["Dense_0"]["kernel"].astype(jnp.float32)).astype(dtype)
    variables = with_kernel(variables, kernel)
    step = variant(lambda v: model.apply(v, X, True, mutable=["batch_stats"])[1])
    for _ in range(10):
        variables = {**variables, **step(variables)}
    sigma = variables["batch_stats"]["SpectralNorm_0"]["Dense_0/kernel/sigma"]
    exact = np.linalg.svd(np.asarray(kernel, np.float64), compute_uv=False)[0]
    np.testing.assert_allclose(float(sigma), exact, rtol=tolerance(dtype))


def test_flax_gives_nan_for_a_float16_zero_kernel():
    """Regression: flax's power iteration runs in float16, where epsilon=1e-12 is zero."""
    flax_model = wrapped(
        nn.SpectralNorm,
        lambda: nn.Dense(3, dtype=jnp.float16, param_dtype=jnp.float16),
        param_dtype=jnp.float16,
    )
    variables = flax_model.init(jax.random.key(0), X, False)
    variables = with_kernel(variables, jnp.zeros((4, 3), jnp.float16))
    y, updates = flax_model.apply(variables, X, True, mutable=["batch_stats"])
    assert bool(jnp.isnan(updates["batch_stats"]["SpectralNorm_0"]["Dense_0/kernel/u"]).all())
    model, _ = low_precision_dense(jnp.float16)
    chex.assert_tree_all_finite(model.apply(variables, X, True, mutable=["batch_stats"]))


class Kernel(nn.Module):
    """Returns its kernel: the wrapper's output is then the normalised kernel itself."""

    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        return self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1], 3), self.dtype)


def test_bfloat16_is_flaxs_float32_result_rounded_once(variant):
    """flax iterates in bfloat16; wrapkit in float32, rounding the results once."""
    model = SpectralNorm(Kernel(jnp.bfloat16), n_steps=3, param_dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(0), X, update_stats=False)
    apply = variant(lambda v: model.apply(v, X, update_stats=True, mutable=["batch_stats"]))
    ours = apply(variables)
    upcast = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), variables)
    theirs = nn.SpectralNorm(Kernel(jnp.float32), n_steps=3).apply(
        upcast, X, update_stats=True, mutable=["batch_stats"]
    )
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(ours)} == {jnp.dtype(jnp.bfloat16)}
    # Within one bfloat16 ulp (2**-7 relative) of flax's float32 results.
    chex.assert_trees_all_close(
        jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), ours),
        jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), theirs),
        rtol=2**-7,
    )


def test_complex_kernel_is_divided_by_its_largest_singular_value(variant):
    model = SpectralNorm(nn.Dense(3, param_dtype=jnp.complex64, dtype=jnp.complex64), n_steps=5)
    variables = model.init(jax.random.key(0), X, update_stats=False)
    assert variables["batch_stats"]["layer_instance/kernel/u"].dtype == jnp.complex64
    step = variant(lambda v: model.apply(v, X, update_stats=True, mutable=["batch_stats"])[1])
    for _ in range(10):
        variables = {**variables, **step(variables)}
    sigma = variables["batch_stats"]["layer_instance/kernel/sigma"]
    assert sigma.dtype == jnp.float32  # real
    kernel = np.asarray(variables["params"]["layer_instance"]["kernel"], np.complex128)
    assert np.abs(kernel.imag).max() > 0.1  # a complex kernel indeed
    np.testing.assert_allclose(float(sigma), np.linalg.svd(kernel, compute_uv=False)[0], rtol=1e-5)
    y = variant(lambda v: model.apply(v, X, update_stats=False))(variables)
    bias = np.asarray(variables["params"]["layer_instance"]["bias"])
    expected = np.asarray(X, np.float64) @ (kernel / float(sigma)) + bias
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-6)


def test_n_steps_zero_leaves_weights_unchanged():
    model = wrapped(SpectralNorm, lambda: nn.Dense(3), n_steps=0)
    variables = model.init(jax.random.key(0), X, False)
    layer = variables["params"]["Dense_0"]
    chex.assert_trees_all_close(
        model.apply(variables, X, False), X @ layer["kernel"] + layer["bias"], rtol=1e-6
    )


def test_update_stats_needs_a_mutable_collection():
    model = wrapped(SpectralNorm, lambda: nn.Dense(3))
    variables = model.init(jax.random.key(0), X, False)
    with pytest.raises(
        ValueError,
        match=r"SpectralNorm\(Dense_0\) was called with update_stats=True, but the collection "
        r"'batch_stats' is not mutable\. Pass mutable=\['batch_stats'\] to apply, or "
        r"update_stats=False\.",
    ):
        model.apply(variables, X, True)


def test_custom_collection_name_is_named_in_the_error():
    model = wrapped(SpectralNorm, lambda: nn.Dense(3), collection_name="spectral")
    variables = model.init(jax.random.key(0), X, False)
    assert set(variables) == {"params", "spectral"}
    with pytest.raises(ValueError, match=r"Pass mutable=\['spectral'\] to apply"):
        model.apply(variables, X, True)


def test_error_on_non_matrix():
    model = wrapped(SpectralNorm, lambda: nn.Conv(4, (3, 3)), error_on_non_matrix=True)
    with pytest.raises(
        ValueError,
        match=r"SpectralNorm\(Conv_0\): 'Conv_0/kernel' has 4 dimensions \(3, 3, 2, 4\), but "
        r"error_on_non_matrix=True\. Pass error_on_non_matrix=False to normalise it as a matrix "
        r"of shape \(-1, 4\)",
    ):
        model.init(jax.random.key(0), jnp.ones((1, 5, 5, 2)), False)


def test_variable_filter_limits_which_matrices_are_normalised():
    class TwoLayers(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="second")(nn.Dense(4, name="first")(x))

    model = SpectralNorm(TwoLayers(), variable_filter="second")
    variables = model.init(jax.random.key(0), X, update_stats=False)
    assert set(variables["batch_stats"]) == {
        "layer_instance/second/kernel/u",
        "layer_instance/second/kernel/sigma",
    }


def test_update_stats_is_taken_by_every_delegated_method():
    class Encoder(nn.Module):
        def setup(self):
            self.dense = nn.Dense(3)

        def encode(self, x):
            return self.dense(x)

    model = SpectralNorm(Encoder(), delegates=("encode",))
    variables = model.init(jax.random.key(0), X, update_stats=False, method="encode")
    z, updates = model.apply(
        variables, X, update_stats=True, method="encode", mutable=["batch_stats"]
    )
    kernel = variables["params"]["layer_instance"]["dense"]["kernel"]
    sigma = updates["batch_stats"]["layer_instance/dense/kernel/sigma"]
    bias = variables["params"]["layer_instance"]["dense"]["bias"]
    chex.assert_trees_all_close(z, X @ (kernel / sigma) + bias, rtol=1e-5)
    with pytest.raises(TypeError, match=r"SpectralNorm\(layer_instance\)\.encode\(\) needs"):
        model.apply(variables, X, method="encode")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"n_steps": True},
            r"n_steps must be a non-negative int \(0 disables it\), got True \(bool\)\. Pass "
            r"e\.g\. n_steps=1\.",
        ),
        ({"n_steps": -1}, r"n_steps must be a non-negative int .*, got -1 \(int\)\."),
        ({"n_steps": 1.0}, r"n_steps must be a non-negative int .*, got 1\.0 \(float\)\."),
        (
            {"epsilon": -1},
            r"epsilon must be a finite non-negative number, got -1\. The default is 1e-12\.",
        ),
        ({"epsilon": None}, r"epsilon must be .*, got None \(NoneType\)\. Pass a float"),
        (
            {"error_on_non_matrix": "yes"},
            r"error_on_non_matrix must be True or False, got 'yes'\. Pass True to refuse kernels",
        ),
        ({"error_on_non_matrix": 0}, r"error_on_non_matrix must be True or False, got 0\."),
        (
            {"collection_name": ""},
            r"collection_name must be a non-empty string naming the collection of u and sigma, "
            r"got ''\. The default is 'batch_stats'\.",
        ),
        ({"collection_name": ("stats",)}, r"collection_name must be .*, got \('stats',\)\."),
        (
            {"dtype": "float33"},
            r"dtype must be None or a floating-point or complex dtype, got 'float33'\.",
        ),
        (
            {"param_dtype": 3},
            r"param_dtype must be a floating-point or complex dtype, got 3\. Pass e\.g\. "
            r"param_dtype=jnp\.float32",
        ),
    ],
    ids=[
        "n_steps=True",
        "n_steps=-1",
        "n_steps=1.0",
        "epsilon=-1",
        "epsilon=None",
        "error_on_non_matrix=yes",
        "error_on_non_matrix=0",
        "collection_name-empty",
        "collection_name-tuple",
        "dtype=float33",
        "param_dtype=3",
    ],
)
def test_invalid_option_fails_when_built(options, message):
    with pytest.raises(ValueError, match=rf"^SpectralNorm\(Dense\) {message}"):
        SpectralNorm(nn.Dense(3), **options)


def test_every_invalid_option_is_reported_at_once():
    with pytest.raises(
        ValueError,
        match=r"^SpectralNorm\(Dense\) has 2 problems:\n  - n_steps must be .*got True \(bool\)"
        r".*\n  - collection_name must be a non-empty string",
    ):
        SpectralNorm(nn.Dense(3), n_steps=True, collection_name="")


@pytest.mark.parametrize(
    "options",
    [
        {"n_steps": 0},
        {"n_steps": np.int64(2)},
        {"epsilon": 0.0},
        {"error_on_non_matrix": np.bool_(True)},
        {"dtype": jnp.bfloat16, "param_dtype": "float16"},
    ],
    ids=str,
)
def test_valid_options_are_accepted(options):
    SpectralNorm(nn.Dense(3), **options)


def test_flax_sigma_of_a_complex_kernel_is_complex():
    """Regression: flax's power iteration uses plain transposes; sigma is then not real."""

    def dense():
        return nn.Dense(3, param_dtype=jnp.complex64, dtype=jnp.complex64)

    flax_model = wrapped(nn.SpectralNorm, dense)
    variables = wrapped(SpectralNorm, dense).init(jax.random.key(0), X, False)
    _, updates = flax_model.apply(variables, X, True, mutable=["batch_stats"])
    assert updates["batch_stats"]["SpectralNorm_0"]["Dense_0/kernel/sigma"].dtype == jnp.complex64
