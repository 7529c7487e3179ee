"""Variable filters match whole path elements, module instances, globs and callables."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from wrapkit import _filters
from wrapkit.linen import WeightNorm


def selects(variable_filter, path):
    return _filters.compile_filter(variable_filter)(path, None, False)


@pytest.mark.parametrize(
    ("variable_filter", "path", "expected"),
    [
        ({"kernel"}, "Dense_0/kernel", True),
        ({"kernel"}, "Dense_0/bias", False),
        ({"kern"}, "Dense_0/kernel", False),
        ({"d1"}, "Sub_0/d1/kernel", True),
        ({"d1"}, "Sub_0/d10/kernel", False),
        ({"Baz"}, "Bar_0/Baz_0/Dense_0/bias", True),
        ({"Baz"}, "Bar_0/Baz_12/Dense_0/bias", True),
        ({"Baz"}, "Bar_0/Bazooka_0/Dense_0/bias", False),
        ({"Baz"}, "Bar_0/Baz_x/kernel", False),
        ({"Dense_*"}, "Bar_0/Dense_3/kernel", True),
        ({"Dense_?"}, "Bar_0/Dense_12/kernel", False),
        ({"Baz_0/Dense_0"}, "Bar_0/Baz_0/Dense_0/kernel", True),
        ({"Baz_1/Dense_0"}, "Bar_0/Baz_0/Dense_0/kernel", False),
        ({"Dense_*/kernel"}, "Bar_0/Dense_1/kernel", True),
        ({"Dense_*/kernel"}, "Bar_0/Dense_1/bias", False),
        ({"Bar_0/kernel"}, "Bar_0/Dense_1/kernel", False),
        ("kernel", "Dense_0/kernel", True),
        (None, "anything/at_all", True),
        (set(), "anything/at_all", True),
        ([lambda path, value: path.endswith("bias")], "Dense_0/bias", True),
        (lambda path, value: path.endswith("bias"), "Dense_0/kernel", False),
    ],
    # No addresses in ids: pytest-xdist workers must collect the same names.
    ids=lambda v: "callable" if callable(v) or "<function" in repr(v) else repr(v),
)
def test_filter_semantics(variable_filter, path, expected):
    assert selects(variable_filter, path) is expected


def test_flax_docstring_filter_selects_the_same_variables_as_flax():
    """flax documents variable_filter={'kernel', 'Baz'} as selecting Baz_0 and Baz_1."""

    class Baz(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x)

    class Bar(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = Baz()(x)
            x = nn.Dense(3)(x)
            x = Baz()(x)
            return nn.Dense(3)(x)

    def model(wrapper_class):
        class Foo(nn.Module):
            @nn.compact
            def __call__(self, x):
                return wrapper_class(Bar(), variable_filter={"kernel", "Baz"})(x)

        return Foo()

    x = jnp.ones((1, 2))
    with pytest.warns(
        UserWarning, match=r"'Bar_0/Baz_\d/Dense_0/bias' of shape \(2,\) has no axis"
    ):
        ours = model(WeightNorm).init(jax.random.key(0), x)["params"]["WeightNorm_0"]
    theirs = model(nn.WeightNorm).init(jax.random.key(0), x)["params"]["WeightNorm_0"]
    assert sorted(ours) == sorted(theirs)
    assert "Bar_0/Baz_1/Dense_0/bias/scale" in ours


def test_substring_filter_regression_flax_selects_d10_for_d1():
    """flax matches 'd1' inside 'd10'; wrapkit selects only the layer named d1."""

    class Layers(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(11):
                x = nn.Dense(4, name=f"d{i}")(x)
            return x

    def scales(wrapper_class):
        class Top(nn.Module):
            @nn.compact
            def __call__(self, x):
                return wrapper_class(Layers(), variable_filter={"d1"})(x)

        return sorted(Top().init(jax.random.key(0), jnp.ones((1, 4)))["params"]["WeightNorm_0"])

    assert "Layers_0/d10/kernel/scale" in scales(nn.WeightNorm)
    with pytest.warns(UserWarning, match=r"'Layers_0/d1/bias' of shape \(4,\) has no axis"):
        assert scales(WeightNorm) == ["Layers_0/d1/bias/scale", "Layers_0/d1/kernel/scale"]


@pytest.mark.parametrize(
    ("variable_filter", "message"),
    [
        ({3}, r"variable_filter entry 3 is neither a string nor a callable"),
        ({"Dense_0//kernel"}, r"variable_filter entry 'Dense_0//kernel' has an empty path element"),
        (3.5, r"variable_filter must be a string, a callable, an iterable of those, or None"),
    ],
    ids=["not-a-string", "empty-element", "not-iterable"],
)
def test_bad_filters_are_rejected_when_the_wrapper_is_built(variable_filter, message):
    with pytest.raises(ValueError, match=r"WeightNorm\(Dense\) " + message):
        WeightNorm(nn.Dense(3), variable_filter=variable_filter)


def test_filter_selecting_nothing_names_the_filter_and_the_variables():
    model = WeightNorm(nn.Dense(3), variable_filter={"kernl"})
    with pytest.raises(
        ValueError,
        match=r"WeightNorm\(layer_instance\): variable_filter \{'kernl'\} selects none of the "
        r"variables that Dense\.__call__ can reach in collections \['params'\]: "
        r"params/layer_instance/bias \(3,\), params/layer_instance/kernel \(2, 3\)\.",
    ):
        model.init(jax.random.key(0), jnp.ones((1, 2)))


def test_single_string_filter_is_one_entry_not_its_characters():
    """flax iterates a string filter character by character, so "kernel" also picks the bias."""

    def scales(wrapper_class):
        class Top(nn.Module):
            @nn.compact
            def __call__(self, x):
                return wrapper_class(nn.Dense(3), variable_filter="kernel")(x)

        return sorted(Top().init(jax.random.key(0), jnp.ones((1, 2)))["params"]["WeightNorm_0"])

    assert scales(nn.WeightNorm) == ["Dense_0/bias/scale", "Dense_0/kernel/scale"]
    assert scales(WeightNorm) == ["Dense_0/kernel/scale"]
