"""The framework-neutral wrapper protocol: is_wrapper, inner, unwrap, chain, registry."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import wrapkit
from wrapkit import _protocol
from wrapkit._protocol import check_delegates
from wrapkit.linen import SpectralNorm, WeightNorm


@pytest.fixture(autouse=True)
def _restore_registry(monkeypatch):
    """Registrations made by a test do not outlive it."""
    monkeypatch.setattr(_protocol, "_REGISTRY", dict(_protocol._REGISTRY))


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


# -- nothing of the object's own code runs to decide ---------------------------------------


class Probed:
    """An object whose attribute hook counts how often it is asked."""

    def __init__(self):
        self.probes = []

    def __getattr__(self, name):
        self.probes.append(name)
        raise AttributeError(name)


class Recursing(nn.Module):
    """A Linen module whose ``__getattr__`` re-enters itself, as some model libraries' do."""

    features: int = 3

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features)(x)

    def __getattr__(self, name):
        if name.startswith("_"):  # flax's own machinery
            return super().__getattr__(name)
        raise RecursionError(f"__getattr__ was asked for {name!r}")


def test_is_wrapper_never_calls_getattr():
    probed = Probed()
    assert not wrapkit.is_wrapper(probed)
    assert wrapkit.chain(probed) == (probed,)
    with pytest.raises(TypeError, match=r"Probed is not a wrapper"):
        wrapkit.inner(probed)
    assert probed.probes == []


def test_a_linen_module_with_a_recursing_getattr_is_not_probed():
    assert not wrapkit.is_wrapper(Recursing())
    assert wrapkit.unwrap(Recursing()).features == 3


def test_summary_of_a_module_with_a_recursing_getattr():
    # The summary's interceptor asks is_wrapper of every module it sees; this was a
    # RecursionError when is_wrapper was an isinstance check on a runtime_checkable Protocol.
    class Top(nn.Module):
        @nn.compact
        def __call__(self, x):
            return WeightNorm(Recursing())(x)

    table = wrapkit.summary(Top(), jax.ShapeDtypeStruct((2, 4), jnp.float32))
    assert [row.module_type for row in table] == ["Top", "WeightNorm", "Recursing", "Dense"]


def test_protocol_wrappers_are_found_without_their_getattr():
    class Shell(Probed):
        def __init__(self, content):
            super().__init__()
            self.content = content

        @property
        def inner(self):
            return self.content

        delegated_methods = ("__call__",)

    class Slotted:
        __slots__ = ("inner", "delegated_methods")

        def __init__(self, content):
            self.inner = content
            self.delegated_methods = ("encode",)

    shell = Shell(Slotted("leaf"))
    assert wrapkit.is_wrapper(shell)
    assert wrapkit.chain(shell) == (shell, shell.content, "leaf")
    assert wrapkit.delegated_methods(shell.content) == ("encode",)
    assert shell.probes == []


def test_instance_attributes_implement_the_protocol():
    class Adhoc:
        def __init__(self, content):
            self.inner = content
            self.delegated_methods = ["__call__"]

    adhoc = Adhoc("leaf")
    assert wrapkit.is_wrapper(adhoc)
    assert wrapkit.unwrap(adhoc) == "leaf"
    assert wrapkit.delegated_methods(adhoc) == ("__call__",)


# -- classes are not wrappers ---------------------------------------------------------------


def _class_id(cls):
    return f"{cls.__module__.split('.')[0]}-{cls.__name__}"


@pytest.mark.parametrize("cls", [WeightNorm, nn.WeightNorm, wrapkit.linen.Wrapper], ids=_class_id)
def test_wrapper_classes_are_not_wrappers(cls):
    assert not wrapkit.is_wrapper(cls)


@pytest.mark.parametrize(
    "query",
    [wrapkit.inner, wrapkit.delegated_methods, wrapkit.chain, wrapkit.unwrap],
    ids=lambda f: f.__name__,
)
@pytest.mark.parametrize("cls", [WeightNorm, nn.WeightNorm, nn.Dense], ids=_class_id)
def test_asking_a_class_is_a_clear_error(query, cls):
    name = query.__name__
    with pytest.raises(
        TypeError,
        match=rf"wrapkit\.{name}: got the class {cls.__name__}, not an instance\. Pass a module, "
        rf"e\.g\. wrapkit\.{name}\({cls.__name__}\(\.\.\.\)\)\.",
    ):
        query(cls)


# -- cycles ---------------------------------------------------------------------------------


def test_chain_refuses_a_wrapper_that_is_its_own_inner():
    class Loop:
        pass

    wrapkit.register_wrapper(Loop, inner=lambda loop: loop)
    with pytest.raises(
        ValueError, match=r"wrapkit\.chain: the wrappers form a cycle, Loop -> Loop,"
    ):
        wrapkit.chain(Loop())
    with pytest.raises(ValueError, match=r"cycle, Loop -> Loop, so there is no innermost module"):
        wrapkit.unwrap(Loop())


def test_chain_names_every_type_in_a_longer_cycle():
    @dataclasses.dataclass(eq=False)
    class Outer:
        content: object = None

    @dataclasses.dataclass(eq=False)
    class Back:
        content: object = None

    wrapkit.register_wrapper(Outer, inner="content")
    wrapkit.register_wrapper(Back, inner="content")
    outer, back = Outer(), Back()
    outer.content, back.content = back, outer
    with pytest.raises(ValueError, match=r"form a cycle, Outer -> Back -> Outer, so there is"):
        wrapkit.chain(outer)
    # Entering the chain above the cycle names only the cycle.
    with pytest.raises(ValueError, match=r"form a cycle, Back -> Outer -> Back, so there is"):
        wrapkit.chain(Outer(back))


def test_chain_refuses_a_protocol_wrapper_that_wraps_itself():
    class Itself:
        delegated_methods = ("__call__",)

        @property
        def inner(self):
            return self

    with pytest.raises(ValueError, match=r"cycle, Itself -> Itself, .* must not be the wrapper"):
        wrapkit.chain(Itself())


# -- register_wrapper validates its arguments ------------------------------------------------


class Box:
    def __init__(self, content):
        self.content = content


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            dict(cls=Box, inner="content", delegates="__call__"),
            r"register_wrapper\(Box\): delegates must be a sequence of method names, got the "
            r"string '__call__'; write delegates=\('__call__',\)\.$",
        ),
        (
            dict(cls=Box, inner="content", delegates=(3,)),
            r"register_wrapper\(Box\): element 0 of delegates must be a method name \(a "
            r"string\), got 3 \(int\)\.$",
        ),
        (
            dict(cls=Box, inner="content", delegates=("encode", "en code")),
            r"element 1 of delegates must be a method name, got 'en code', which is not a "
            r"Python identifier\.$",
        ),
        (
            dict(cls=Box, inner="content", delegates=7),
            r"delegates must be a sequence of method names, got 7 \(int\); write e\.g\. "
            r"delegates=\('__call__',\)\.$",
        ),
        (
            dict(cls=Box, inner="content", delegates=None),
            r"register_wrapper\(Box\): delegates must be a sequence of method names, got None "
            r"\(NoneType\); write e\.g\. delegates=\('__call__',\)\.$",
        ),
        (
            dict(cls=Box, inner="contents"),
            r"register_wrapper\(Box\): inner='contents', but Box has no attribute 'contents' "
            r"\(no class attribute, property, dataclass field, annotation, slot or constructor "
            r"parameter of that name\)\. Name the attribute that holds the inner module, or "
            r"give a function: inner=lambda wrapper: \.\.\.$",
        ),
        (
            dict(cls=int, inner=7),
            r"register_wrapper\(int\): inner must be an attribute name \(a string\) or a "
            r"function from a wrapper to its inner module, got 7 \(int\)\.$",
        ),
        (
            dict(cls=3, inner="x"),
            r"register_wrapper\(3\): cls must be a class, got 3 \(int\); pass the wrapper "
            r"class, e\.g\. register_wrapper\(type\(wrapper\), \.\.\.\)\.$",
        ),
    ],
    ids=[
        "delegates-string",
        "delegates-not-strings",
        "delegates-not-identifiers",
        "delegates-not-iterable",
        "delegates-none",
        "inner-unknown-attribute",
        "inner-wrong-type",
        "cls-not-a-class",
    ],
)
def test_register_wrapper_rejects_bad_arguments(arguments, message):
    with pytest.raises(TypeError, match=message):
        wrapkit.register_wrapper(**arguments)
    assert arguments["cls"] not in _protocol._REGISTRY


def test_register_wrapper_lists_every_problem_at_once():
    with pytest.raises(TypeError) as raised:
        wrapkit.register_wrapper(Box, inner="contents", delegates=("encode", 3, "a-b"))
    lines = str(raised.value).splitlines()
    assert lines[0] == "register_wrapper(Box) has 3 problems:"
    assert [line[:40] for line in lines[1:]] == [
        "  - inner='contents', but Box has no att",
        "  - element 1 of delegates must be a met",
        "  - element 2 of delegates must be a met",
    ]
    with pytest.raises(TypeError, match=r"register_wrapper\('Box'\) has 3 problems:\n  - cls must"):
        wrapkit.register_wrapper("Box", inner=None, delegates="encode")


class _Base:
    annotated: object


@dataclasses.dataclass
class _Field:
    field: object


class _Slots:
    __slots__ = ("slot",)


class _Attributes(_Base, _Slots):
    class_attribute = None

    def __init__(self, parameter=None):
        self._parameter = parameter

    @property
    def prop(self):
        return self._parameter


@pytest.mark.parametrize(
    ("cls", "name"),
    [
        (_Attributes, "class_attribute"),
        (_Attributes, "prop"),
        (_Field, "field"),
        (_Attributes, "annotated"),
        (_Attributes, "slot"),
        (_Attributes, "parameter"),
        (nn.WeightNorm, "layer_instance"),
    ],
    ids=[
        "class-attribute",
        "property",
        "dataclass-field",
        "base-annotation",
        "slot",
        "init",
        "flax",
    ],
)
def test_register_wrapper_accepts_every_kind_of_attribute(cls, name):
    assert wrapkit.register_wrapper(cls, inner=name) is cls


def test_variadic_constructor_parameters_are_not_attributes():
    class Anything:
        def __init__(self, *args, **kwargs):
            pass

    with pytest.raises(TypeError, match=r"Anything has no attribute 'args'"):
        wrapkit.register_wrapper(Anything, inner="args")


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (
            "attend",
            r"wrapkit\.delegated_methods\(Pair\): the value returned by Pair's registered "
            r"delegates function must be a sequence of method names, got the string 'attend'; "
            r"give \('attend',\) for one method\.$",
        ),
        (
            ("attend", None),
            r"wrapkit\.delegated_methods\(Pair\): element 1 of the value returned by Pair's "
            r"registered delegates function must be a method name \(a string\), got None "
            r"\(NoneType\)\.$",
        ),
    ],
    ids=["string", "not-strings"],
)
def test_a_delegates_function_returning_bad_names_is_a_clear_error(returned, message):
    @dataclasses.dataclass
    class Pair:
        first: object
        methods: object

    wrapkit.register_wrapper(Pair, inner="first", delegates=lambda pair: pair.methods)
    with pytest.raises(TypeError, match=message):
        wrapkit.delegated_methods(Pair(None, returned))


def test_a_delegates_function_may_return_any_iterable():
    wrapkit.register_wrapper(Box, inner="content", delegates=lambda box: iter(["a", "b"]))
    assert wrapkit.delegated_methods(Box(None)) == ("a", "b")
    wrapkit.register_wrapper(Box, inner="content", delegates=(name for name in ["encode"]))
    assert wrapkit.delegated_methods(Box(None)) == ("encode",)
    assert wrapkit.delegated_methods(Box(None)) == ("encode",)


def test_a_protocol_wrapper_with_string_delegates_is_a_clear_error():
    class Shell:
        inner = None
        delegated_methods = "__call__"

    with pytest.raises(
        TypeError,
        match=r"wrapkit\.delegated_methods\(Shell\): Shell\.delegated_methods must be a "
        r"sequence of method names, got the string '__call__'; give \('__call__',\) for one "
        r"method\.$",
    ):
        wrapkit.delegated_methods(Shell())


# -- check_delegates, shared with wrapkit.linen.Wrapper ---------------------------------------


@pytest.mark.parametrize(
    "delegates",
    [("__call__",), ["encode", "decode"], (), ("class_",)],
    ids=["call", "list", "empty", "underscore"],
)
def test_check_delegates_accepts_method_names(delegates):
    assert check_delegates(delegates, "delegates") == []


@pytest.mark.parametrize(
    ("delegates", "owner", "problems"),
    [
        (
            "encode",
            "delegates",
            [
                "delegates must be a sequence of method names, got the string 'encode'; "
                "write delegates=('encode',)."
            ],
        ),
        (
            "encode",
            "Pair.delegated_methods",
            [
                "Pair.delegated_methods must be a sequence of method names, got the string "
                "'encode'; give ('encode',) for one method."
            ],
        ),
        (
            None,
            "delegates",
            [
                "delegates must be a sequence of method names, got None (NoneType); write e.g. "
                "delegates=('__call__',)."
            ],
        ),
        (
            ("encode", b"decode", "3d"),
            "delegates",
            [
                "element 1 of delegates must be a method name (a string), got b'decode' (bytes).",
                "element 2 of delegates must be a method name, got '3d', which is not a Python "
                "identifier.",
            ],
        ),
    ],
    ids=["string-keyword", "string-phrase", "none", "elements"],
)
def test_check_delegates_describes_each_problem(delegates, owner, problems):
    assert check_delegates(delegates, owner) == problems
