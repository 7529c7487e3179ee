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
