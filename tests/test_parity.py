"""Parity of wrapkit.linen.WeightNorm and SpectralNorm with the installed flax classes.

wrapkit's wrappers are drop-ins: the same constructor arguments, the same variables, and the
same outputs (and updated statistics) on the same variables, whichever class initialised them.
Every expected value here comes from running flax's class, or from a formula written out in
this file; none is copied from a run.

Tested on their own below:

* Deliberate deviation: at init, flax stores its normalised view of the weights as the raw
  parameters (WeightNorm's ``scale * v / ||v||``, SpectralNorm's ``W / sigma``); wrapkit stores
  the raw initial weights. Normalising wrapkit's gives flax's.
* A variable that WeightNorm selects but has no axis to reduce over (a bias with
  ``feature_axes=-1``) becomes ``sign(value) * scale``, in flax and in wrapkit, which also
  warns. The sweeps keep a reduction axis on every selected variable, so they run silently.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import MISSING
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import wrapkit.linen as wl

# Few examples: the file runs on two shared cores in well under 90 s. A failure prints the
# blob that reproduces it (@reproduce_failure); no example database is written.
SETTINGS = settings(max_examples=4, deadline=None, database=None, print_blob=True)
SWEEP = settings(SETTINGS, max_examples=2)  # the sweeps over inner modules and dtypes
DTYPES = [jnp.float32, jnp.bfloat16]
DTYPE_IDS = ["float32", "bfloat16"]


def normal_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """N(0, 1) drawn by numpy from the bits of the jax key flax hands the initialiser.

    Eager jax compiles its samplers once per shape; with shapes drawn at random that costs
    more than this file's time budget on two cores. numpy compiles nothing.
    """
    try:
        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    except jax.errors.TracerArrayConversionError:
        # flax's apply traces initialisers with jax.eval_shape to check parameter shapes.
        return jnp.zeros(shape, dtype)
    return jnp.asarray(np.random.default_rng(seed).standard_normal(tuple(shape)), dtype)


# Every inner layer's initialisers; non-zero biases, so normalising them shows.
INITS = {"kernel_init": normal_init, "bias_init": normal_init}
SCALE_INITS = [nn.initializers.ones, nn.initializers.constant(2.5), normal_init]
PAIRS = [(nn.WeightNorm, wl.WeightNorm), (nn.SpectralNorm, wl.SpectralNorm)]
PAIR_IDS = ["WeightNorm", "SpectralNorm"]
OMIT = object()  # an option left to its default


@pytest.fixture(params=[lambda f: f, jax.jit], ids=["eager", "jit"], scope="module")
def variant(request: pytest.FixtureRequest) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return request.param


# -- inner modules ------------------------------------------------------------------------


class Baz(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(2, dtype=self.dtype, param_dtype=self.dtype, **INITS)(x)


class Bar(nn.Module):
    """Nested submodules, as in flax's WeightNorm docstring."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.dtype, **INITS)
        x = Baz(self.dtype)(x)
        x = dense(3)(x)
        x = Baz(self.dtype)(x)
        return dense(3)(x)


@dataclasses.dataclass(frozen=True)
class Inner:
    """How to build an inner module in a given dtype, and an input for it."""

    kind: str
    make: Callable[[Any], nn.Module]
    x_shape: tuple[int, ...]
    kernel_rank: int

    @property
    def matrices_only(self) -> bool:
        return self.kernel_rank <= 2


def _make_dense(n_out: int) -> Callable[[Any], nn.Module]:
    return lambda dt: nn.Dense(n_out, dtype=dt, param_dtype=dt, **INITS)


def _make_conv(layer: type[nn.Module], n_out: int, window: tuple[int, ...]) -> Callable[..., Any]:
    return lambda dt: layer(n_out, window, dtype=dt, param_dtype=dt, **INITS)


def _make_einsum(dt: Any) -> nn.Module:
    return nn.Einsum((3, 4, 5), "ab,bcd->acd", dtype=dt, param_dtype=dt, **INITS)


# Fixed shapes for the sweeps over inner modules, options and dtypes: eager jax compiles each
# operation once per shape, so new shapes in every example would not fit the time budget.
# The random_* strategies below draw the shapes.
INNERS = {
    "dense": Inner("dense", _make_dense(3), (2, 5), 2),
    "conv": Inner("conv", _make_conv(nn.Conv, 4, (3, 3)), (1, 6, 6, 2), 4),
    "conv_transpose": Inner(
        "conv_transpose", _make_conv(nn.ConvTranspose, 3, (2, 2)), (1, 4, 4, 2), 4
    ),
    "einsum": Inner("einsum", _make_einsum, (2, 3), 3),  # its bias is (4, 5): 2-D
    "composite": Inner("composite", lambda dt: Bar(dt), (1, 2), 2),
}


def _dims(max_value: int = 3) -> st.SearchStrategy[int]:
    return st.integers(1, max_value)


@st.composite
def random_convs(draw: st.DrawFn) -> Inner:
    """A 1-D or 2-D convolution: kernels of rank 3 or 4, each dimension from 1 to 3."""
    window = tuple(draw(st.lists(_dims(), min_size=1, max_size=2)))
    n_in, n_out = draw(_dims()), draw(_dims())
    x_shape = (1, *(4 for _ in window), n_in)
    return Inner("conv", _make_conv(nn.Conv, n_out, window), x_shape, len(window) + 2)


@st.composite
def random_denses(draw: st.DrawFn) -> Inner:
    return Inner("dense", _make_dense(draw(_dims())), (2, draw(_dims())), 2)


KINDS = list(INNERS)


# -- building the wrappers the way users do ---------------------------------------------


class Parent(nn.Module):
    """Builds its wrapper inside ``@nn.compact``: the inner module becomes a sibling."""

    build: Callable[[], nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array, **kwargs: Any) -> Any:
        return self.build()(x, **kwargs)


def build(
    wrapper: type[nn.Module],
    make_inner: Callable[[], nn.Module],
    options: dict[str, Any],
    *,
    nested: bool,
    keyword: bool,
) -> nn.Module:
    options = {name: value for name, value in options.items() if value is not OMIT}

    def wrap() -> nn.Module:
        if keyword:
            return wrapper(layer_instance=make_inner(), **options)
        return wrapper(make_inner(), **options)

    return Parent(wrap) if nested else wrap()


def layout(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), tree)


def upcast(tree: Any) -> Any:
    """``tree`` with its bfloat16 leaves in float32 (exactly: float32 holds every bfloat16)."""
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a, tree
    )


def assert_same(actual: Any, expected: Any, dtype: Any, *, eager: bool = False) -> None:
    """``actual`` is flax's ``expected``: to a few float32 ulps, or rounded once to bfloat16.

    In float32 wrapkit runs flax's operations in flax's order (pinned by
    ``test_numerics.test_float32_is_flaxs_operations_in_flaxs_order``). Eagerly every
    primitive runs on its own, the same primitive on the same inputs on the same machine, so
    the two agree to the last bit (``eager``). Under ``jit`` XLA compiles the two programs
    separately and may fuse and vectorise their reductions differently: a few ulps.

    In bfloat16 flax is wrong (it sums squares in bfloat16), so ``expected`` comes from flax
    run on the float32-upcast variables: wrapkit computes in float32 and rounds once, so the
    two agree within one bfloat16 ulp (2**-7 relative).
    """
    if dtype == jnp.bfloat16:
        expected = jax.tree_util.tree_map(lambda e, a: e.astype(a.dtype), expected, actual)
        widen = functools.partial(jax.tree_util.tree_map, lambda a: a.astype(jnp.float32))
        chex.assert_trees_all_close(widen(actual), widen(expected), rtol=2**-7, atol=2**-7)
    elif eager:
        chex.assert_trees_all_equal(actual, expected)
    else:
        chex.assert_trees_all_close(actual, expected, rtol=1e-6, atol=1e-6)


def check_parity(
    theirs: nn.Module,
    ours: nn.Module,
    x: jax.Array,
    variant: Callable[[Callable[..., Any]], Callable[..., Any]],
    dtype: Any,
    *,
    mutable: Any = False,
    **call_kwargs: Any,
) -> tuple[Any, Any]:
    """Inits with both classes and applies each init with both; returns both inits."""
    key = jax.random.key(0)
    theirs_init = theirs.init(key, x, **call_kwargs)
    ours_init = ours.init(key, x, **call_kwargs)
    assert jax.tree_util.tree_structure(ours_init) == jax.tree_util.tree_structure(theirs_init)
    assert layout(ours_init) == layout(theirs_init)
    # One function per class, applied to both inits: under jit, one compilation each.
    apply_theirs, apply_ours = (
        variant(functools.partial(model.apply, mutable=mutable, **call_kwargs))
        for model in (theirs, ours)
    )
    reference = upcast if dtype == jnp.bfloat16 else (lambda tree: tree)
    for variables in (theirs_init, ours_init):
        assert_same(
            apply_ours(variables, x),
            apply_theirs(reference(variables), x),
            dtype,
            eager=variant is not jax.jit,
        )
    return theirs_init, ours_init


def random_input(shape: tuple[int, ...], dtype: Any, seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def l2_normalize(value: jax.Array, feature_axes: tuple[int, ...], eps: float) -> jax.Array:
    """Written out from the paper: ``v / ||v||`` over every axis but ``feature_axes``."""
    axes = tuple(axis for axis in range(value.ndim) if axis not in feature_axes)
    return value / jnp.sqrt(jnp.sum(value**2, axis=axes, keepdims=True) + eps)


def spectral_normalize(
    matrix: jax.Array, u: jax.Array, n_steps: int, eps: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Power iteration from ``u`` (Miyato et al.), written out: ``(matrix / sigma, u, sigma)``."""
    for _ in range(n_steps):
        v = u @ matrix.T
        v = v / jnp.sqrt(jnp.sum(v**2) + eps)
        u = v @ matrix
        u = u / jnp.sqrt(jnp.sum(u**2) + eps)
    sigma = (v @ matrix @ u.T)[0, 0]
    return matrix / sigma, u, sigma


# -- constructor ------------------------------------------------------------------------


@pytest.mark.parametrize("theirs, ours", PAIRS, ids=PAIR_IDS)
def test_signature_matches_flax(theirs: type[nn.Module], ours: type[nn.Module]) -> None:
    """Every flax argument, with flax's default, in flax's order; extras keyword-only."""
    flax_parameters = inspect.signature(theirs).parameters
    our_parameters = inspect.signature(ours).parameters
    factories = {f.name for f in dataclasses.fields(theirs) if f.default_factory is not MISSING}
    theirs_default, ours_default = theirs(nn.Dense(1)), ours(nn.Dense(1))
    for name, parameter in flax_parameters.items():
        assert name in our_parameters, name
        if name in ("layer_instance", "parent", "name"):
            continue
        assert getattr(ours_default, name) == getattr(theirs_default, name), name
        if name not in factories:
            assert our_parameters[name].default == parameter.default, name

    extras = set(our_parameters) - set(flax_parameters)
    assert {n: our_parameters[n].kind for n in extras} == dict.fromkeys(
        extras, inspect.Parameter.KEYWORD_ONLY
    )
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert [n for n, p in our_parameters.items() if p.kind is positional] == [
        n for n, p in flax_parameters.items() if p.kind is positional
    ]


POSITIONAL_VALUES = {
    "WeightNorm": (1e-3, jnp.bfloat16, jnp.float16, False, SCALE_INITS[1], 0, ("bias",)),
    "SpectralNorm": (3, 1e-3, jnp.bfloat16, jnp.float16, True, "spectral"),
}


@pytest.mark.parametrize("theirs, ours", PAIRS, ids=PAIR_IDS)
def test_positional_arguments_match_flax(theirs: type[nn.Module], ours: type[nn.Module]) -> None:
    values = POSITIONAL_VALUES[theirs.__name__]
    expected = theirs(nn.Dense(1), *values)
    actual = ours(nn.Dense(1), *values)
    names = list(inspect.signature(theirs).parameters)[1 : 1 + len(values)]
    assert {n: getattr(actual, n) for n in names} == {n: getattr(expected, n) for n in names}


# -- variable layout --------------------------------------------------------------------


@pytest.mark.parametrize(
    "nested, keyword",
    [(True, False), (True, True), (False, False), (False, True)],
    ids=["nested", "nested-keyword", "top-level", "top-level-keyword"],
)
@pytest.mark.parametrize("theirs, ours", PAIRS, ids=PAIR_IDS)
def test_variable_layout_matches_flax(
    theirs: type[nn.Module], ours: type[nn.Module], nested: bool, keyword: bool
) -> None:
    x = random_input((2, 5), jnp.float32)
    kwargs = {"update_stats": False} if theirs is nn.SpectralNorm else {}
    trees = [
        build(cls, lambda: nn.Dense(3, **INITS), {}, nested=nested, keyword=keyword).init(
            jax.random.key(0), x, **kwargs
        )
        for cls in (theirs, ours)
    ]
    assert layout(trees[1]) == layout(trees[0])
    inner = "Dense_0" if nested else "layer_instance"
    params = trees[1]["params"]
    assert set(params[inner]) == {"kernel", "bias"}
    if theirs is nn.WeightNorm:
        own = params["WeightNorm_0"] if nested else params
        assert f"{inner}/kernel/scale" in own
    else:
        stats = trees[1]["batch_stats"]
        own = stats["SpectralNorm_0"] if nested else stats
        assert set(own) == {f"{inner}/kernel/u", f"{inner}/kernel/sigma"}


# -- WeightNorm -------------------------------------------------------------------------


def feature_axes_for(rank: int) -> st.SearchStrategy[Any]:
    """One or more axes of a ``rank``-array that leave at least one axis to reduce over."""
    axis = st.integers(-rank, rank - 1)
    several = (
        st.lists(axis, min_size=1, max_size=rank)
        .filter(lambda axes: len({a % rank for a in axes}) < rank)
        .map(tuple)
    )
    return st.one_of(axis, several)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(OMIT), strategy)


@st.composite
def weight_norm_options(draw: st.DrawFn, inner: Inner, dtype: Any) -> dict[str, Any]:
    if draw(st.booleans()):
        # One norm over all axes: every variable keeps something to reduce over.
        filters = [None, {"kernel"}, {"kernel", "bias"}]
        if inner.kind == "composite":
            filters.append({"kernel", "Baz"})
        axes = {"feature_axes": None, "variable_filter": draw(st.sampled_from(filters))}
    else:
        axes = {
            "feature_axes": draw(maybe(feature_axes_for(inner.kernel_rank))),
            "variable_filter": draw(maybe(st.just({"kernel"}))),
        }
    return {
        "epsilon": draw(maybe(st.sampled_from([1e-12, 1e-4]))),
        "use_scale": draw(maybe(st.booleans())),
        "scale_init": draw(maybe(st.sampled_from(SCALE_INITS))),
        "dtype": dtype if dtype != jnp.float32 else draw(maybe(st.just(dtype))),
        "param_dtype": dtype if dtype != jnp.float32 else draw(maybe(st.just(dtype))),
        **axes,
    }


def check_weight_norm_parity(inner: Inner, dtype: Any, variant: Any, data: st.DataObject) -> None:
    options = data.draw(weight_norm_options(inner, dtype), label="options")
    nested, keyword = data.draw(st.booleans(), "nested"), data.draw(st.booleans(), "keyword")
    theirs, ours = (
        build(cls, lambda: inner.make(dtype), options, nested=nested, keyword=keyword)
        for cls in (nn.WeightNorm, wl.WeightNorm)
    )
    check_parity(theirs, ours, random_input(inner.x_shape, dtype), variant, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
@SWEEP
@given(data=st.data())
def test_weight_norm_parity(variant: Any, kind: str, dtype: Any, data: st.DataObject) -> None:
    """Each inner module and dtype; placement, feature axes, filter and options drawn."""
    check_weight_norm_parity(INNERS[kind], dtype, variant, data)


@SETTINGS
@given(inner=random_convs(), data=st.data())
def test_weight_norm_parity_on_random_conv_kernels(
    variant: Any, inner: Inner, data: st.DataObject
) -> None:
    """Kernels of rank 3 or 4 and random sizes, with random feature-axis tuples."""
    check_weight_norm_parity(inner, jnp.float32, variant, data)


@pytest.mark.parametrize(
    "options",
    [
        {"feature_axes": -1},
        {"feature_axes": 0},
        {"feature_axes": (0, -1)},
        {"feature_axes": [0, -1]},
        {"feature_axes": (-2, 1, 0)},
        {"feature_axes": None},
        {"feature_axes": None, "variable_filter": None},
        {"feature_axes": None, "variable_filter": {"kernel", "bias"}},
        {"use_scale": False},
        {"scale_init": normal_init},
        {"epsilon": 1e-2},
    ],
    ids=[
        "axes=-1",
        "axes=0",
        "axes=(0,-1)",
        "axes=[0,-1]",
        "axes=(-2,1,0)",
        "axes=None",
        "axes=None-filter=None",
        "axes=None-filter=kernel+bias",
        "use_scale=False",
        "scale_init=normal",
        "epsilon=1e-2",
    ],
)
def test_weight_norm_conv_options(variant: Any, options: dict[str, Any]) -> None:
    """A 3x3 convolution with each feature-axis form and option of flax's class."""
    conv = INNERS["conv"]
    theirs, ours = (
        build(cls, lambda: conv.make(jnp.float32), options, nested=True, keyword=False)
        for cls in (nn.WeightNorm, wl.WeightNorm)
    )
    check_parity(theirs, ours, random_input(conv.x_shape, jnp.float32), variant, jnp.float32)


@SETTINGS
@given(
    inner=random_convs(),
    data=st.data(),
    scale=st.floats(0.5, 3.0),
    eps=st.sampled_from([1e-12, 1e-2]),
)
def test_weight_norm_init_kernel_is_flax_kernel_normalised(
    inner: Inner, data: st.DataObject, scale: float, eps: float
) -> None:
    """Flax stores ``scale * v / ||v||`` at init; wrapkit stores ``v``, from the same rng."""
    feature_axes = data.draw(st.one_of(st.none(), feature_axes_for(inner.kernel_rank)))
    options = {
        "feature_axes": feature_axes,
        "scale_init": nn.initializers.constant(scale),
        "epsilon": eps,
    }
    x = random_input(inner.x_shape, jnp.float32)
    theirs, ours = (
        build(cls, lambda: inner.make(jnp.float32), options, nested=True, keyword=False).init(
            jax.random.key(0), x
        )["params"]
        for cls in (nn.WeightNorm, wl.WeightNorm)
    )
    # Exact: the same initialisers on the same keys; the scale and bias are not normalised.
    chex.assert_trees_all_equal(ours["WeightNorm_0"], theirs["WeightNorm_0"])
    chex.assert_trees_all_equal(ours["Conv_0"]["bias"], theirs["Conv_0"]["bias"])
    kernel = ours["Conv_0"]["kernel"]
    axes = () if feature_axes is None else feature_axes
    axes = tuple({a % kernel.ndim for a in ((axes,) if isinstance(axes, int) else axes)})
    chex.assert_trees_all_close(
        scale * l2_normalize(kernel, axes, eps), theirs["Conv_0"]["kernel"], rtol=1e-6, atol=1e-6
    )


def flax_docstring_model(wrapper: type[nn.Module]) -> nn.Module:
    """The example of flax's WeightNorm docstring, with ``wrapper`` in place of flax's."""

    class Foo(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            x = nn.Dense(3, **INITS)(x)
            x = wrapper(nn.Dense(4, **INITS), variable_filter=None)(x)
            x = nn.Dense(5, **INITS)(x)
            return wrapper(Bar(), variable_filter={"kernel", "Baz"})(x)

    return Foo()


@pytest.mark.filterwarnings("ignore:WeightNorm.*has no axis to normalise:UserWarning")
def test_weight_norm_flax_docstring_example(variant: Any) -> None:
    """Two wrappers in one model, filters None and {'kernel', 'Baz'} over nested modules."""
    theirs, ours = (flax_docstring_model(cls) for cls in (nn.WeightNorm, wl.WeightNorm))
    check_parity(theirs, ours, random_input((1, 2), jnp.float32), variant, jnp.float32)


@pytest.mark.filterwarnings("ignore:WeightNorm.*has no axis to normalise:UserWarning")
def test_weight_norm_unreducible_variable_becomes_sign_times_scale(variant: Any) -> None:
    """A selected variable with no axis left to reduce over (a bias, feature_axes=-1).

    Normalising each element by its own magnitude leaves ``sign(value)``: flax does so and
    creates ``Dense_0/bias/scale``; wrapkit does the same, for checkpoint parity, and warns.
    """
    x = random_input((2, 5), jnp.float32)
    eps = 1e-12
    theirs, ours = (
        build(
            cls,
            lambda: nn.Dense(3, **INITS),
            {"variable_filter": None, "epsilon": eps},
            nested=True,
            keyword=False,
        )
        for cls in (nn.WeightNorm, wl.WeightNorm)
    )
    with pytest.warns(UserWarning, match=r"'Dense_0/bias' of shape \(3,\) has no axis"):
        ours.init(jax.random.key(0), x)
    _, ours_init = check_parity(theirs, ours, x, variant, jnp.float32)
    assert set(ours_init["params"]["WeightNorm_0"]) == {
        "Dense_0/kernel/scale",
        "Dense_0/bias/scale",
    }

    kernel, bias = ours_init["params"]["Dense_0"]["kernel"], ours_init["params"]["Dense_0"]["bias"]
    kernel_scale = random_input((3,), jnp.float32, seed=2)
    bias_scale = random_input((3,), jnp.float32, seed=3)
    variables = {
        "params": {
            "Dense_0": {"kernel": kernel, "bias": bias},
            "WeightNorm_0": {
                "Dense_0/kernel/scale": kernel_scale,
                "Dense_0/bias/scale": bias_scale,
            },
        }
    }
    expected = x @ (kernel_scale * l2_normalize(kernel, (1,), eps)) + jnp.sign(bias) * bias_scale
    for model in (theirs, ours):
        chex.assert_trees_all_close(
            variant(model.apply)(variables, x), expected, rtol=1e-5, atol=1e-5
        )


# -- SpectralNorm -----------------------------------------------------------------------


@st.composite
def spectral_norm_options(draw: st.DrawFn, inner: Inner, dtype: Any) -> dict[str, Any]:
    return {
        "n_steps": draw(maybe(st.sampled_from([1, 3]))),
        "epsilon": draw(maybe(st.sampled_from([1e-12, 1e-4]))),
        "dtype": dtype if dtype != jnp.float32 else draw(maybe(st.just(dtype))),
        "param_dtype": dtype if dtype != jnp.float32 else draw(maybe(st.just(dtype))),
        "error_on_non_matrix": draw(
            maybe(st.booleans() if inner.matrices_only else st.just(False))
        ),
        "collection_name": draw(maybe(st.just("spectral"))),
    }


def check_spectral_parity(
    inner: Callable[[], nn.Module],
    options: dict[str, Any],
    x: jax.Array,
    variant: Any,
    dtype: Any,
    *,
    update_stats: bool,
    nested: bool = True,
    keyword: bool = False,
) -> None:
    theirs, ours = (
        build(cls, inner, options, nested=nested, keyword=keyword)
        for cls in (nn.SpectralNorm, wl.SpectralNorm)
    )
    collection = options.get("collection_name", OMIT)
    collection = "batch_stats" if collection is OMIT else collection
    theirs_init, ours_init = check_parity(
        theirs,
        ours,
        x,
        variant,
        dtype,
        mutable=[collection] if update_stats else False,
        update_stats=update_stats,
    )
    if dtype == jnp.bfloat16 and update_stats:
        # flax's init iterates in bfloat16. The reference: flax's update, on the float32
        # upcast, of the u that init draws (the same with update_stats=False).
        drawn = ours.init(jax.random.key(0), x, update_stats=False)
        _, expected = theirs.apply(upcast(drawn), x, update_stats=True, mutable=[collection])
        assert_same(ours_init[collection], expected[collection], dtype)
    else:
        # Exact: the same rng draws u, and an update at init runs flax's operations in
        # flax's order, eagerly (init is not jitted), on the same machine.
        chex.assert_trees_all_equal(ours_init[collection], theirs_init[collection])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kind", KINDS)
@SWEEP
@given(data=st.data())
def test_spectral_norm_parity(variant: Any, kind: str, dtype: Any, data: st.DataObject) -> None:
    """Each inner module and dtype; placement, n_steps, update_stats and options drawn."""
    draw_spectral_parity(INNERS[kind], dtype, variant, data)


@SETTINGS
@given(inner=st.one_of(random_denses(), random_convs()), data=st.data())
def test_spectral_norm_parity_on_random_shapes(
    variant: Any, inner: Inner, data: st.DataObject
) -> None:
    """Dense and 1-D or 2-D conv layers of random sizes; conv kernels flattened to matrices."""
    draw_spectral_parity(inner, jnp.float32, variant, data)


def draw_spectral_parity(inner: Inner, dtype: Any, variant: Any, data: st.DataObject) -> None:
    check_spectral_parity(
        lambda: inner.make(dtype),
        data.draw(spectral_norm_options(inner, dtype), label="options"),
        random_input(inner.x_shape, dtype),
        variant,
        dtype,
        update_stats=data.draw(st.booleans(), label="update_stats"),
        nested=data.draw(st.booleans(), label="nested"),
        keyword=data.draw(st.booleans(), label="keyword"),
    )


@pytest.mark.parametrize("update_stats", [True, False], ids=["update", "frozen"])
@pytest.mark.parametrize("n_steps", [1, 3], ids=["n_steps=1", "n_steps=3"])
def test_spectral_norm_conv_kernel(variant: Any, n_steps: int, update_stats: bool) -> None:
    """A 4-D conv kernel is normalised as a matrix (error_on_non_matrix=False)."""
    check_spectral_parity(
        lambda: nn.Conv(4, (3, 3), **INITS),
        {"n_steps": n_steps, "error_on_non_matrix": False},
        random_input((1, 6, 6, 2), jnp.float32),
        variant,
        jnp.float32,
        update_stats=update_stats,
    )


@pytest.mark.parametrize(
    "cls, message",
    [
        (nn.SpectralNorm, "4D but error_on_non_matrix is True"),
        (wl.SpectralNorm, r"'Conv_0/kernel' has 4 dimensions .* error_on_non_matrix=True"),
    ],
    ids=["flax", "wrapkit"],
)
def test_spectral_norm_error_on_non_matrix(cls: type[nn.Module], message: str) -> None:
    model = build(
        cls,
        lambda: nn.Conv(4, (3, 3), **INITS),
        {"error_on_non_matrix": True},
        nested=True,
        keyword=False,
    )
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.key(0), jnp.ones((1, 6, 6, 2)), update_stats=False)


@pytest.mark.parametrize("n_steps", [1, 3], ids=["n_steps=1", "n_steps=3"])
def test_spectral_norm_init_kernel_is_flax_kernel_normalised(n_steps: int) -> None:
    """Flax stores ``W / sigma(W)`` at init; wrapkit stores ``W``, from the same rng."""
    x = random_input((1, 6, 6, 2), jnp.float32)

    def init(cls: type[nn.Module], update_stats: bool) -> Any:
        model = build(
            cls,
            lambda: nn.Conv(4, (3, 3), **INITS),
            {"n_steps": n_steps},
            nested=True,
            keyword=False,
        )
        return model.init(jax.random.key(0), x, update_stats=update_stats)

    theirs, ours = init(nn.SpectralNorm, False), init(wl.SpectralNorm, False)
    kernel = ours["params"]["Conv_0"]["kernel"]
    u0 = ours["batch_stats"]["SpectralNorm_0"]["Conv_0/kernel/u"]
    normalised, u, sigma = spectral_normalize(kernel.reshape(-1, 4), u0, n_steps, 1e-12)
    chex.assert_trees_all_close(
        normalised.reshape(kernel.shape),
        theirs["params"]["Conv_0"]["kernel"],
        rtol=1e-5,
        atol=1e-6,
    )
    # Initialising with update_stats=True stores the u and sigma of that power iteration.
    chex.assert_trees_all_close(
        init(wl.SpectralNorm, True)["batch_stats"]["SpectralNorm_0"],
        {"Conv_0/kernel/u": u, "Conv_0/kernel/sigma": sigma},
        rtol=1e-5,
        atol=1e-6,
    )
