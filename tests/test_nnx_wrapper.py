"""The NNX wrapper base class: views instead of writes, stacks, delegation, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wrapkit.nnx import WeightNorm, Wrapper


class Doubled(Wrapper):
    default_filter = ("kernel",)

    def transform(self, leaf):
        return 2 * leaf.value


def raw(module):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module)))


def test_a_forward_pass_leaves_the_raw_weights_bit_identical():
    model = WeightNorm(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
    before = raw(model)
    model(jnp.ones((4, 2)))
    jax.tree.map(np.testing.assert_array_equal, raw(model), before)


def test_every_submodule_of_a_sequential_is_transformed():
    a = nnx.Linear(2, 3, use_bias=False, rngs=nnx.Rngs(0))
    b = nnx.Linear(3, 1, use_bias=False, rngs=nnx.Rngs(1))
    x = jnp.arange(4.0).reshape(2, 2)
    expected = jax.nn.relu(x @ (2 * a.kernel[...])) @ (2 * b.kernel[...])
    model = Doubled(nnx.Sequential(a, jax.nn.relu, b))
    np.testing.assert_allclose(model(x), expected, rtol=1e-6)


def test_stacked_wrappers_apply_innermost_first_and_never_select_each_others_variables():
    layer = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    model = Doubled(WeightNorm(layer))
    x = jnp.ones((1, 2))
    kernel = layer.kernel[...]
    expected = x @ (2 * kernel / jnp.linalg.norm(kernel, axis=0)) + layer.bias[...]
    np.testing.assert_allclose(model(x), expected, rtol=1e-6)
    assert not hasattr(model, "scale")  # Doubled has no own variables
    assert list(model.layer_instance.scale) == ["kernel"]


def test_a_method_that_is_not_delegated_cannot_read_a_transformed_weight():
    model = Doubled(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), delegates=())
    with pytest.raises(TypeError, match=r"does not delegate '__call__'.*delegates=\('__call__',\)"):
        model(jnp.ones((1, 2)))


def test_a_filter_that_selects_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"selects none of the Param variables of Linear"):
        WeightNorm(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), variable_filter="kernl")


def fresh_pair(seed=0):
    """wrapkit's and flax's NNX WeightNorm around equal Linears, with equal random scales."""
    ours = WeightNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(seed)))
    theirs = nnx.WeightNorm(nnx.Linear(3, 4, rngs=nnx.Rngs(seed)), rngs=nnx.Rngs(1))
    scale = jax.random.uniform(jax.random.key(seed + 7), (4,), minval=0.5, maxval=2.0)
    ours.scale["kernel"][...] = scale
    theirs.scales = nnx.data({("kernel",): scale})
    return ours, theirs


RUNS = {
    "eager": lambda m, x: m(x),
    "nnx.jit": nnx.jit(lambda m, x: m(x)),
    "nnx.grad": lambda m, x: nnx.grad(lambda m: m(x).sum())(m),
}


@pytest.mark.parametrize("run", list(RUNS.values()), ids=list(RUNS))
def test_flax_5576_flax_writes_the_normalised_kernel_into_the_layer_and_ours_never_does(run):
    ours, theirs = fresh_pair()
    kernel = np.array(ours.layer_instance.kernel[...])
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    run(ours, x)
    run(theirs, x)
    np.testing.assert_array_equal(ours.layer_instance.kernel[...], kernel)
    # flax's raw Param now holds g * v / ||v||, so an optimizer would update that.
    normalised = kernel / np.linalg.norm(kernel, axis=0) * np.asarray(ours.scale["kernel"][...])
    np.testing.assert_allclose(theirs.layer_instance.kernel[...], normalised, rtol=1e-5)
    assert not np.allclose(theirs.layer_instance.kernel[...], kernel)


def test_a_first_forward_from_fresh_variables_equals_flaxs_nnx_weight_norm():
    ours, theirs = fresh_pair(seed=3)
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    # Ours gives the same again; its raw weight and scale are where they were.
    np.testing.assert_allclose(ours(x), theirs.layer_instance(x), rtol=1e-6, atol=1e-6)


def test_keyword_arguments_reach_the_wrapped_module():
    class Scaled(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(2, 2, rngs=rngs)

        def __call__(self, x, *, factor=1.0):
            return factor * self.linear(x)

    model = WeightNorm(Scaled(nnx.Rngs(0)))
    x = jnp.ones((1, 2))
    np.testing.assert_allclose(model(x, factor=3.0), 3.0 * model(x), rtol=1e-6)
