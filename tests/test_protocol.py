"""The framework-neutral wrapper protocol: is_wrapper, inner, unwrap, chain, registry."""

import dataclasses

import flax.linen as nn
import pytest

import wrapkit
from wrapkit.linen import SpectralNorm, WeightNorm


@pytest.mark.parametrize(
    "wrapper",
    [
        WeightNorm(nn.Dense(4)),
        SpectralNorm(nn.Dense(4)),
        nn.WeightNorm(nn.Dense(4)),
        nn.SpectralNorm(nn.Dense(4)),
    ],
    ids=["wrapkit-weight-norm", "wrapkit-spectral-norm", "flax-weight-norm", "flax-spectral-norm"],
)
def test_wrappers_expose_inner_and_delegates(wrapper):
    assert wrapkit.is_wrapper(wrapper)
    assert isinstance(wrapkit.inner(wrapper), nn.Dense)
    assert wrapkit.inner(wrapper) is wrapper.layer_instance
    assert wrapkit.delegated_methods(wrapper) == ("__call__",)
    assert wrapkit.unwrap(wrapper) is wrapper.layer_instance
    assert wrapkit.chain(wrapper) == (wrapper, wrapper.layer_instance)


def test_wrapkit_wrappers_implement_the_protocol_directly():
    wrapper = WeightNorm(nn.Dense(4), delegates=("__call__",))
    assert isinstance(wrapper, wrapkit.WrapperProtocol)
    assert wrapper.inner is wrapper.layer_instance
    assert not isinstance(nn.WeightNorm(nn.Dense(4)), wrapkit.WrapperProtocol)


def test_plain_modules_are_not_wrappers():
    dense = nn.Dense(4)
    assert not wrapkit.is_wrapper(dense)
    assert wrapkit.unwrap(dense) is dense
    assert wrapkit.chain(dense) == (dense,)


def test_chain_goes_through_every_level():
    dense = nn.Dense(4)
    spectral = SpectralNorm(dense)
    weight = WeightNorm(spectral)
    assert wrapkit.chain(weight) == (weight, spectral, dense)
    assert wrapkit.unwrap(weight) is dense


def test_per_instance_delegates_are_reported():
    class AutoEncoder(nn.Module):
        def encode(self, x):
            return x

        def decode(self, z):
            return z

    wrapper = WeightNorm(AutoEncoder(), delegates=("encode", "decode"))
    assert wrapkit.delegated_methods(wrapper) == ("encode", "decode")


def test_registry_joins_third_party_classes_by_attribute_and_by_function():
    @dataclasses.dataclass
    class Holder:
        content: object

    @dataclasses.dataclass
    class Pair:
        first: object
        methods: tuple

    wrapkit.register_wrapper(Holder, inner="content")
    wrapkit.register_wrapper(Pair, inner=lambda pair: pair.first, delegates=lambda p: p.methods)
    leaf = nn.Dense(2)
    nested = Holder(Pair(leaf, ("attend",)))
    assert wrapkit.chain(nested) == (nested, nested.content, leaf)
    assert wrapkit.delegated_methods(nested) == ("__call__",)
    assert wrapkit.delegated_methods(nested.content) == ("attend",)


def test_registration_covers_subclasses():
    class Base:
        def __init__(self, wrapped):
            self.wrapped = wrapped

    class Derived(Base):
        pass

    wrapkit.register_wrapper(Base, inner="wrapped", delegates=("encode",))
    assert wrapkit.inner(Derived("x")) == "x"
    assert wrapkit.delegated_methods(Derived("x")) == ("encode",)


@pytest.mark.parametrize(
    "query", [wrapkit.inner, wrapkit.delegated_methods], ids=lambda f: f.__name__
)
def test_asking_a_non_wrapper_is_a_clear_error(query):
    with pytest.raises(TypeError, match=r"Dense is not a wrapper\. Wrappers implement"):
        query(nn.Dense(3))


def test_register_wrapper_rejects_bad_arguments():
    with pytest.raises(TypeError, match=r"register_wrapper expects a class, got 3"):
        wrapkit.register_wrapper(3, inner="x")
    with pytest.raises(TypeError, match=r"register_wrapper\(int\): inner must be an attribute"):
        wrapkit.register_wrapper(int, inner=7)
