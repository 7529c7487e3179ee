"""WeightNorm beyond flax parity: its deliberate deviations and its errors."""

import re
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wrapkit._numerics import l2_normalize
from wrapkit.linen import WeightNorm

X = jax.random.normal(jax.random.key(1), (2, 4))
PARTITIONED_INIT = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))


@pytest.fixture(params=[lambda f: f, jax.jit], ids=["eager", "jit"])
def variant(request):
    return request.param


def wrapped_dense(wrapper_class, **dense_kwargs):
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            return wrapper_class(nn.Dense(3, **dense_kwargs))(x)

    return Top()


def test_init_stores_the_inner_modules_own_initial_values():
    """flax stores the normalised kernel as the raw parameter; wrapkit keeps the raw one."""
    variables = WeightNorm(nn.Dense(3)).init(jax.random.key(0), X)

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="layer_instance")(x)

    plain = Plain().init(jax.random.key(0), X)["params"]["layer_instance"]
    # Exact: the same initialisers on the same key, on the same machine; nothing normalised.
    chex.assert_trees_all_equal(variables["params"]["layer_instance"], plain)
    flax_kernel = nn.WeightNorm(nn.Dense(3)).init(jax.random.key(0), X)["params"]
    chex.assert_trees_all_close(
        flax_kernel["layer_instance"]["kernel"], l2_normalize(plain["kernel"], axis=0), rtol=1e-6
    )


def test_scale_of_a_partitioned_kernel_is_partitioned_like_the_feature_axis():
    variables = wrapped_dense(WeightNorm, kernel_init=PARTITIONED_INIT).init(jax.random.key(0), X)
    scale = variables["params"]["WeightNorm_0"]["Dense_0/kernel/scale"]
    assert isinstance(scale, nn.Partitioned)
    assert scale.names == ("mlp",)
    assert nn.get_partition_spec(variables)["params"]["WeightNorm_0"]["Dense_0/kernel/scale"] == (
        jax.sharding.PartitionSpec("mlp")
    )


def test_flax_loses_the_partitioning_of_the_scale():
    """Regression: flax names the scale '.../kernel/value/scale' and leaves it unboxed."""
    model = wrapped_dense(nn.WeightNorm, kernel_init=PARTITIONED_INIT)
    scales = model.init(jax.random.key(0), X)["params"]["WeightNorm_0"]
    assert list(scales) == ["Dense_0/kernel/value/scale"]
    assert not isinstance(scales["Dense_0/kernel/value/scale"], nn.Partitioned)


def test_checkpoint_of_flax_with_a_partitioned_kernel_applies_unchanged(variant):
    flax_model = wrapped_dense(nn.WeightNorm, kernel_init=PARTITIONED_INIT)
    variables = flax_model.init(jax.random.key(0), X)
    variables["params"]["WeightNorm_0"] = jax.tree_util.tree_map(
        lambda s: s * 1.5, variables["params"]["WeightNorm_0"]
    )
    ours = wrapped_dense(WeightNorm, kernel_init=PARTITIONED_INIT)
    chex.assert_trees_all_close(
        variant(ours.apply)(variables, X), variant(flax_model.apply)(variables, X), rtol=1e-6
    )


LOW_PRECISION = [jnp.float16, jnp.bfloat16]
LOW_PRECISION_IDS = ["float16", "bfloat16"]


def tolerance(dtype):
    """A few roundings of ``dtype``: what one cast of a float32 result (and a matmul) costs."""
    return 4 * float(jnp.finfo(dtype).eps)


def with_kernel(variables, kernel):
    params = {**variables["params"], "Dense_0": {**variables["params"]["Dense_0"]}}
    params["Dense_0"]["kernel"] = kernel
    return {**variables, "params": params}


@pytest.mark.parametrize(
    "dtype", [jnp.float32, *LOW_PRECISION], ids=["float32", *LOW_PRECISION_IDS]
)
@pytest.mark.parametrize("scale", [0.0, 1e-4], ids=["zero", "tiny"])
def test_zero_and_tiny_weights_give_finite_outputs_and_gradients(variant, dtype, scale):
    """In float16, 1e-12 and the squares of a 1e-4 kernel underflow: computed in float32."""
    model = wrapped_dense(WeightNorm, param_dtype=dtype, dtype=dtype)
    variables = model.init(jax.random.key(0), X)
    kernel = variables["params"]["Dense_0"]["kernel"]
    variables = with_kernel(variables, (scale * kernel.astype(jnp.float32)).astype(dtype))

    def loss(params):
        return model.apply({"params": params}, X).astype(jnp.float32).sum()

    value, grads = variant(jax.value_and_grad(loss))(variables["params"])
    assert np.isfinite(value)
    chex.assert_tree_all_finite(grads)
    assert grads["Dense_0"]["kernel"].dtype == jnp.dtype(dtype)
    if scale == 0:
        chex.assert_trees_all_close(
            model.apply(variables, X),
            jnp.broadcast_to(variables["params"]["Dense_0"]["bias"], (2, 3)),
        )


@pytest.mark.parametrize(
    "dtype", [jnp.float32, *LOW_PRECISION], ids=["float32", *LOW_PRECISION_IDS]
)
def test_output_does_not_depend_on_the_scale_of_the_kernel(variant, dtype):
    model = wrapped_dense(WeightNorm, param_dtype=dtype, dtype=dtype)
    variables = model.init(jax.random.key(0), X)
    kernel = variables["params"]["Dense_0"]["kernel"].astype(jnp.float32)
    apply = variant(model.apply)
    y = apply(variables, X)
    y_small = apply(with_kernel(variables, (1e-3 * kernel).astype(dtype)), X)
    tol = tolerance(dtype)
    chex.assert_trees_all_close(
        y_small.astype(jnp.float32), y.astype(jnp.float32), rtol=tol, atol=tol
    )


def test_flax_gives_nan_for_a_float16_zero_kernel():
    """Regression: flax sums the squares in float16, where epsilon=1e-12 is zero."""
    flax_model = wrapped_dense(nn.WeightNorm, param_dtype=jnp.float16, dtype=jnp.float16)
    # flax's init stores its float32 view (the scale is float32) as the kernel: set it.
    variables = with_kernel(flax_model.init(jax.random.key(0), X), jnp.zeros((4, 3), jnp.float16))
    assert bool(jnp.isnan(flax_model.apply(variables, X)).all())
    ours = wrapped_dense(WeightNorm, param_dtype=jnp.float16, dtype=jnp.float16)
    chex.assert_tree_all_finite(ours.apply(variables, X))


class Kernel(nn.Module):
    """Returns its kernel: the wrapper's output is then the normalised kernel itself."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return self.param("kernel", nn.initializers.normal(1.0), (x.shape[-1], 3), self.dtype)


def test_bfloat16_kernel_is_flaxs_float32_result_rounded_once(variant):
    """flax normalises a bfloat16 kernel in bfloat16; wrapkit in float32, rounding once."""
    model = WeightNorm(Kernel(jnp.bfloat16), param_dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(0), X)
    scale_name = "layer_instance/kernel/scale"
    variables["params"][scale_name] = jnp.linspace(0.5, 2.0, 3).astype(jnp.bfloat16)
    ours = variant(model.apply)(variables, X)
    assert ours.dtype == jnp.bfloat16
    upcast = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), variables)
    theirs = nn.WeightNorm(Kernel(jnp.float32)).apply(upcast, X)
    # Within one bfloat16 ulp (2**-7 relative) of flax's float32 result.
    chex.assert_trees_all_close(
        ours.astype(jnp.float32), theirs.astype(jnp.bfloat16).astype(jnp.float32), rtol=2**-7
    )


def test_complex_kernel_is_normalised_by_its_modulus(variant):
    model = WeightNorm(nn.Dense(3, param_dtype=jnp.complex64, dtype=jnp.complex64))
    variables = model.init(jax.random.key(0), X)
    params = variables["params"]
    params["layer_instance/kernel/scale"] = jnp.array([0.5, 1.0, 2.0])
    y = variant(model.apply)(variables, X)
    assert y.dtype == jnp.complex64
    kernel = np.asarray(params["layer_instance"]["kernel"], np.complex128)
    assert np.abs(kernel.imag).max() > 0.1  # a complex kernel indeed
    expected = np.asarray(X, np.float64) @ (
        np.asarray([0.5, 1.0, 2.0]) * kernel / np.linalg.norm(kernel, axis=0)
    ) + np.asarray(params["layer_instance"]["bias"])
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-6)


def test_all_feature_axes_warns_and_keeps_flax_numerics():
    """variable_filter=None makes the bias sign(b) * scale in flax; wrapkit warns about it."""

    def model(wrapper_class):
        class Top(nn.Module):
            @nn.compact
            def __call__(self, x):
                return wrapper_class(nn.Dense(3), variable_filter=None)(x)

        return Top()

    variables = model(nn.WeightNorm).init(jax.random.key(0), X)
    variables["params"]["Dense_0"]["bias"] = jnp.array([-2.0, 0.5, 3.0])
    with pytest.warns(
        UserWarning,
        match=r"WeightNorm\(Dense_0\): 'Dense_0/bias' of shape \(3,\) has no axis to normalise "
        r"over \(feature_axes=-1 covers all its axes\), so it becomes sign\(value\) \* scale",
    ):
        ours = model(WeightNorm).apply(variables, X)
    chex.assert_trees_all_close(ours, model(nn.WeightNorm).apply(variables, X), rtol=1e-6)
    params = variables["params"]
    kernel = params["WeightNorm_0"]["Dense_0/kernel/scale"] * l2_normalize(
        params["Dense_0"]["kernel"], axis=0
    )
    bias = jnp.sign(params["Dense_0"]["bias"]) * params["WeightNorm_0"]["Dense_0/bias/scale"]
    chex.assert_trees_all_close(ours, X @ kernel + bias, rtol=1e-6)


@pytest.mark.parametrize(
    ("feature_axes", "allowed"),
    [(2, r"\[-2, 1\]"), ((0, -3), r"\[-2, 1\]")],
    ids=["positive", "negative-in-tuple"],
)
def test_feature_axes_out_of_range(feature_axes, allowed):
    model = WeightNorm(nn.Dense(3), feature_axes=feature_axes)
    with pytest.raises(
        ValueError,
        match=rf"WeightNorm\(layer_instance\): feature_axes={re.escape(repr(feature_axes))} is out "
        rf"of range for 'layer_instance/kernel' of shape \(4, 3\)\. Use axes in {allowed}, or "
        r"feature_axes=None",
    ):
        model.init(jax.random.key(0), X)


def test_feature_axes_of_the_wrong_type_fail_when_built():
    with pytest.raises(
        ValueError,
        match=r"WeightNorm\(Dense\) feature_axes must be an int, a tuple of ints or None",
    ):
        WeightNorm(nn.Dense(3), feature_axes=1.5)


def test_feature_axes_none_uses_one_norm_and_a_scalar_scale():
    model = WeightNorm(nn.Conv(5, (3, 3)), feature_axes=None)
    x = jax.random.normal(jax.random.key(2), (1, 6, 6, 2))
    variables = model.init(jax.random.key(0), x)
    params = variables["params"]
    assert params["layer_instance/kernel/scale"].shape == ()
    kernel = params["layer_instance/kernel/scale"] * l2_normalize(
        params["layer_instance"]["kernel"]
    )
    expected = nn.Conv(5, (3, 3)).apply(
        {"params": {"kernel": kernel, "bias": params["layer_instance"]["bias"]}}, x
    )
    chex.assert_trees_all_close(model.apply(variables, x), expected, rtol=1e-5)


class DenseBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        return nn.BatchNorm(use_running_average=not train, momentum=0.5)(nn.Dense(3)(x))


def test_batch_norm_inside_the_wrapped_module_updates_its_statistics():
    """Regression: flax maps every collection read-only, so a wrapped BatchNorm cannot train."""

    def model(wrapper_class):
        class Top(nn.Module):
            @nn.compact
            def __call__(self, x, train):
                return wrapper_class(DenseBatchNorm())(x, train)

        return Top()

    x = jax.random.normal(jax.random.key(2), (8, 4))
    variables = model(WeightNorm).init(jax.random.key(0), x, False)
    _, updates = model(WeightNorm).apply(variables, x, True, mutable=["batch_stats"])
    params = variables["params"]
    dense = params["DenseBatchNorm_0"]["Dense_0"]
    scale = params["WeightNorm_0"]["DenseBatchNorm_0/Dense_0/kernel/scale"]
    h = x @ (scale * l2_normalize(dense["kernel"], axis=0)) + dense["bias"]
    stats = updates["batch_stats"]["DenseBatchNorm_0"]["BatchNorm_0"]
    chex.assert_trees_all_close(stats["mean"], 0.5 * h.mean(axis=0), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(stats["var"], 0.5 + 0.5 * h.var(axis=0), rtol=1e-5)
    with pytest.raises(flax.errors.ModifyScopeVariableError, match=r"collection \"batch_stats\""):
        model(nn.WeightNorm).apply(variables, x, True, mutable=["batch_stats"])


def test_numpy_integer_feature_axes_are_accepted_like_python_ints():
    x = jax.random.normal(jax.random.key(2), (1, 6, 6, 2))
    as_numpy = WeightNorm(nn.Conv(4, (3, 3)), feature_axes=(np.int64(0), np.int32(-1)))
    as_python = WeightNorm(nn.Conv(4, (3, 3)), feature_axes=(0, -1))
    variables = as_python.init(jax.random.key(0), x)
    assert variables["params"]["layer_instance/kernel/scale"].shape == (3, 4)
    # Exact: both run the very same operations on the same inputs, on the same machine.
    chex.assert_trees_all_equal(as_numpy.apply(variables, x), as_python.apply(variables, x))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"feature_axes": True},
            r"feature_axes must be an int, a tuple of ints or None, got True \(bool\)\. Pass "
            r"e\.g\. feature_axes=-1 \(the last axis, a kernel's output features\), "
            r"feature_axes=\(0, -1\), or None for one norm over all axes\.",
        ),
        ({"feature_axes": (0, False)}, r"feature_axes must be .*, got \(0, False\) \(tuple\)"),
        ({"feature_axes": "01"}, r"feature_axes must be .*, got '01' \(str\)"),
        (
            {"use_scale": "no"},
            r"use_scale must be True or False, got 'no'\. Pass use_scale=False for unit-norm",
        ),
        ({"use_scale": 1}, r"use_scale must be True or False, got 1\."),
        (
            {"epsilon": -1},
            r"epsilon must be a finite non-negative number, got -1\. The default is 1e-12\.",
        ),
        ({"epsilon": float("nan")}, r"epsilon must be a finite non-negative number, got nan\."),
        (
            {"epsilon": "1e-12"},
            r"epsilon must be a finite non-negative number, got '1e-12' \(str\)\. Pass a float, "
            r"e\.g\. epsilon=1e-12\.",
        ),
        ({"epsilon": True}, r"epsilon must be .*, got True \(bool\)"),
        (
            {"scale_init": 1.0},
            r"scale_init must be an initializer called as scale_init\(key, shape, dtype\) -> "
            r"array, got 1\.0 \(float\)\. For a constant scale, pass "
            r"scale_init=nn\.initializers\.constant\(1\.0\)\.",
        ),
        (
            {"scale_init": 2},
            r"scale_init must be .*, got 2 \(int\)\. .*nn\.initializers\.constant\(2\)\.",
        ),
        (
            {"scale_init": "ones"},
            r"scale_init must be .*, got 'ones' \(str\)\. .*nn\.initializers\.constant\(1\.0\)\.",
        ),
        (
            {"dtype": "float33"},
            r"dtype must be None or a floating-point or complex dtype, got 'float33'\. Pass e\.g\. "
            r"dtype=jnp\.float32 or dtype=jnp\.bfloat16\.",
        ),
        (
            {"param_dtype": 3},
            r"param_dtype must be a floating-point or complex dtype, got 3\. Pass e\.g\. "
            r"param_dtype=jnp\.float32",
        ),
        ({"param_dtype": jnp.int8}, r"param_dtype must be .*, got the dtype int8\."),
        ({"param_dtype": None}, r"param_dtype must be a floating-point .*, got None\."),
    ],
    ids=[
        "feature_axes=True",
        "feature_axes-bool-in-tuple",
        "feature_axes-str",
        "use_scale=no",
        "use_scale=1",
        "epsilon=-1",
        "epsilon=nan",
        "epsilon-str",
        "epsilon=True",
        "scale_init=1.0",
        "scale_init=2",
        "scale_init-str",
        "dtype=float33",
        "param_dtype=3",
        "param_dtype=int8",
        "param_dtype=None",
    ],
)
def test_invalid_option_fails_when_built(options, message):
    with pytest.raises(ValueError, match=rf"^WeightNorm\(Dense\) {message}"):
        WeightNorm(nn.Dense(3), **options)


def test_invalid_option_names_the_module_it_wraps():
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            return WeightNorm(nn.Dense(3), use_scale="no")(x)

    with pytest.raises(
        ValueError, match=r"^WeightNorm\(Dense_0\) use_scale must be True or False, got 'no'\."
    ):
        Top().init(jax.random.key(0), X)


def test_every_invalid_option_is_reported_at_once():
    with pytest.raises(
        ValueError,
        match=r"^WeightNorm\(Dense\) has 3 problems:\n  - epsilon must be .*\n  - use_scale must "
        r"be True or False, got 'no'\. .*\n  - param_dtype must be .*got 'float33'\.",
    ):
        WeightNorm(nn.Dense(3), epsilon=-1.0, use_scale="no", param_dtype="float33")


@pytest.mark.parametrize(
    "options",
    [
        {"epsilon": 0},
        {"epsilon": np.float32(1e-6)},
        {"use_scale": np.bool_(False)},
        {"dtype": "bfloat16", "param_dtype": np.float16},
        {"dtype": jnp.complex64},
        {"feature_axes": ()},
        {"feature_axes": [np.int32(0), -1]},
        {"scale_init": nn.initializers.constant(2.0)},
    ],
    # No addresses in ids: pytest-xdist workers must collect the same names.
    ids=lambda options: ",".join(options),
)
def test_valid_options_are_accepted(options):
    WeightNorm(nn.Dense(3), **options)
