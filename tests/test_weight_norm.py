"""WeightNorm beyond flax parity: its deliberate deviations and its errors."""

import re

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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_zero_norm_weight_gives_finite_outputs_and_gradients(variant, dtype):
    model = wrapped_dense(WeightNorm, param_dtype=dtype, dtype=dtype)
    variables = model.init(jax.random.key(0), X)
    variables["params"]["Dense_0"]["kernel"] = jnp.zeros_like(
        variables["params"]["Dense_0"]["kernel"]
    )

    def loss(params):
        return model.apply({"params": params}, X).astype(jnp.float32).sum()

    value, grads = variant(jax.value_and_grad(loss))(variables["params"])
    assert np.isfinite(value)
    chex.assert_tree_all_finite(grads)
    chex.assert_trees_all_close(
        model.apply(variables, X), jnp.broadcast_to(variables["params"]["Dense_0"]["bias"], (2, 3))
    )


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
    chex.assert_trees_all_equal(as_numpy.apply(variables, x), as_python.apply(variables, x))
