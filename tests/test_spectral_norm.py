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


def test_zero_weight_gives_finite_outputs_and_gradients(variant):
    model = wrapped(SpectralNorm, lambda: nn.Dense(3))
    variables = model.init(jax.random.key(0), X, False)
    params = jax.tree_util.tree_map(jnp.zeros_like, variables["params"])

    def loss(params):
        return model.apply({**variables, "params": params}, X, False).sum()

    value, grads = variant(jax.value_and_grad(loss))(params)
    assert np.isfinite(value)
    chex.assert_tree_all_finite(grads)


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


def test_negative_n_steps_fails_when_built():
    with pytest.raises(
        ValueError, match=r"SpectralNorm\(Dense\) n_steps must be a non-negative int"
    ):
        SpectralNorm(nn.Dense(3), n_steps=-1)


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
