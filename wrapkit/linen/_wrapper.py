"""The Linen wrapper base class: delegation, variable transforms and stacking.

A delegated call runs the inner module's own method through ``nn.map_variables``: the inner
module reads a *view* of its variables in which every selected variable has been passed
through the wrapper's ``transform``. The view is never written back, so a forward pass cannot
change parameters, whatever ``mutable`` says. Because the mapped function is the inner class's
own method, tools that intercept module calls see ``Dense_0.__call__`` (or ``encode``), not a
helper such as flax's ``layer_forward``.

Stacked wrappers (``WeightNorm(SpectralNorm(Dense))``) keep the variables they transform in
the innermost module, outside the scope of the wrappers in between. So a wrapper whose inner
module is itself a wrapper does not map variables; it hands its transform down, and the
innermost wrapper applies the whole stack, innermost transform first:
``kernel -> SpectralNorm -> WeightNorm -> Dense``.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import types
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import flax.linen as nn
import jax
from flax.core.meta import AxisMetadata
from flax.linen.module import wrap_method_once
from jax._src import source_info_util  # the name stack: no public API reads or sets it

from .. import _filters
from .._filters import VariableFilter

_REQUIRED = inspect.Parameter.empty


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One variable of the wrapped module, as a wrapper's ``transform`` sees it.

    Attributes:
        path: the variable's name prefixed by the wrapped module's name, e.g.
            ``"Dense_1/kernel"``; the same string flax uses to name a wrapper's per-variable
            variables (``"Dense_1/kernel/scale"``).
        collection: the variable's collection, e.g. ``"params"``.
        value: the variable's value (unboxed), after the transforms of any wrappers below
            this one.
        metadata: the variable's box when it carries metadata (``nn.Partitioned`` from
            ``nn.with_partitioning``), else ``None``.
    """

    path: str
    collection: str
    value: jax.Array
    metadata: AxisMetadata | None = None

    def box_like(self, value: Any, axes: Sequence[int]) -> Any:
        """``value`` boxed with this variable's partitioning, restricted to ``axes``.

        A wrapper uses this to give a per-variable parameter (a scale over the feature axes,
        a low-rank factor) the sharding of the axes it was made from. Without partitioning
        metadata, ``value`` is returned as is.
        """
        if isinstance(self.metadata, nn.Partitioned):
            names = tuple(self.metadata.names[axis] for axis in axes)
            return self.metadata.replace(value=value, names=names)
        return value


@dataclasses.dataclass
class _Handoff:
    """Transforms an outer wrapper hands down to the wrapper it wraps, for one call."""

    stack: tuple[_Applied, ...]
    receiver: type
    taken: bool = False


@dataclasses.dataclass(frozen=True)
class _Applied:
    """A wrapper with the options of its current call."""

    wrapper: Wrapper
    options: dict[str, Any]
    select: Callable[[str, Any], bool]
    # The name stack of the wrapper's own call. In a stack, the innermost wrapper runs
    # every transform; each runs under its own wrapper's name stack, so jaxpr-level tools
    # (the summary engine) attribute its equations to the wrapper that owns it.
    name_stack: Any


# Set by a wrapper around the call of the wrapper it wraps; read once by that call.
_HANDOFF: contextvars.ContextVar[_Handoff | None] = contextvars.ContextVar(
    "wrapkit_handoff", default=None
)

_HOOKS = ("transform", "argument_errors")

# Where flax creates the classes that nn.remat(Cls), nn.jit(Cls), ... return.
_LIFTED_CLASSES_MODULE = "flax.linen.transforms"


def _describe(wrapper: Any) -> str:
    inner = wrapper.__dict__.get("layer_instance")
    inner_name = getattr(inner, "name", None) or type(inner).__name__
    return f"{type(wrapper).__name__}({inner_name})"


def _delegated(wrapper: Any) -> tuple[str, ...]:
    # Read from the instance dict: this runs before flax has finished building the module.
    delegates = wrapper.__dict__.get("delegates")
    return type(wrapper).default_delegates if delegates is None else tuple(delegates)


def _public_methods(module: nn.Module) -> list[str]:
    """Methods a user defined on ``module``'s class (not flax's Module API)."""
    fields = {field.name for field in dataclasses.fields(module)}
    own = [klass for klass in type(module).__mro__ if klass not in (nn.Module, object)]
    names = {
        name
        for klass in own
        for name, value in vars(klass).items()
        if (name == "__call__" or not (name.startswith("_") or hasattr(nn.Module, name)))
        and name not in fields
        and callable(value)
        and not isinstance(value, type | classmethod | staticmethod)
    }
    return sorted(names, key=lambda name: (name != "__call__", name))


@functools.cache
def _delegating_method(name: str) -> Callable[..., Any]:
    """A compact Module method named ``name`` that delegates to the inner module.

    Flax names a method call after the function's ``__name__`` (interceptors, named scopes),
    so ``wrapper.encode(x)`` is seen as a call of ``encode`` on the wrapper.
    """

    def method(self: Wrapper, *args: Any, **kwargs: Any) -> Any:
        return self._delegate(name, args, kwargs)

    method.__name__ = method.__qualname__ = name
    return wrap_method_once(nn.compact(method))


class Wrapper(nn.Module):
    """Base class of Linen wrappers: holds an inner module and delegates methods to it.

    A delegated call runs the inner module's method on a view of its variables in which each
    variable selected by ``variable_filter`` (in ``collections``) is replaced by
    ``transform(leaf)``. A subclass defines ``transform`` and, as class attributes or as
    dataclass fields, the settings below. ``transform`` may create the wrapper's own
    variables with ``self.param`` / ``self.variable``; keyword-only parameters of
    ``transform`` become keyword arguments of every delegated call (``update_stats`` of
    [`SpectralNorm`][wrapkit.linen.SpectralNorm]), taken by the wrapper and not passed on.

    Attributes:
        layer_instance: the wrapped module (flax's name for it; also available as ``inner``).
        delegates: per-instance override of the delegated methods, e.g.
            ``("encode", "decode")``; ``None`` uses the class's ``default_delegates``.
        default_delegates: class setting, the methods delegated by default.
        variable_filter: which variables to transform: strings matching whole path elements
            (``"kernel"``; ``"Baz"`` also selects ``Baz_0``, ``Baz_1``), globs, callables
            ``(path, value) -> bool``, or ``None`` for all. A filter that selects nothing
            is an error.
        collections: the variable collections the transform applies to.

    Examples:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from wrapkit.linen import Wrapper
        >>> class Doubled(Wrapper):
        ...     variable_filter = "kernel"
        ...     def transform(self, leaf):
        ...         return 2 * leaf.value
        >>> model = Doubled(nn.Dense(1, use_bias=False, kernel_init=nn.initializers.ones))
        >>> model.apply(model.init(jax.random.key(0), jnp.ones((1, 3))), jnp.ones((1, 3)))
        Array([[6.]], dtype=float32)
    """

    layer_instance: nn.Module
    delegates: Sequence[str] | None = dataclasses.field(default=None, kw_only=True)

    # Class settings, annotated for type checkers only: at run time an annotated ClassVar takes
    # a place in the dataclass field order, and a subclass that redeclares one as a field
    # (flax's positional variable_filter of WeightNorm) would inherit that place, shifting its
    # positional arguments.
    if TYPE_CHECKING:
        default_delegates: ClassVar[tuple[str, ...]] = ("__call__",)
        variable_filter: VariableFilter = None
        collections: ClassVar[tuple[str, ...]] = ("params",)
    else:
        default_delegates = ("__call__",)
        variable_filter = None
        collections = ("params",)
    _call_options: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The hooks run once per variable inside a delegated call; keeping them out of
        # flax's method wrapping keeps them out of interceptors and call records too.
        for hook in _HOOKS:
            if hook in cls.__dict__:
                nn.nowrap(cls.__dict__[hook])
        super().__init_subclass__(**kwargs)
        parameters = list(inspect.signature(cls.transform).parameters.values())
        cls._call_options = {
            p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY
        }

    def __post_init__(self) -> None:
        self._check_arguments()
        super().__post_init__()

    # -- the protocol ---------------------------------------------------------------------

    @property
    def inner(self) -> nn.Module:
        """The wrapped module (``layer_instance``)."""
        return self.layer_instance

    @property
    def delegated_methods(self) -> tuple[str, ...]:
        """The inner module's methods this wrapper delegates."""
        return _delegated(self)

    # -- hooks for subclasses -------------------------------------------------------------

    @nn.nowrap
    def transform(self, leaf: Leaf) -> jax.Array:
        """Returns the value the inner module sees for one selected variable.

        Subclasses must define it. Keyword-only parameters added after ``leaf`` become
        keyword arguments of every delegated call.
        """
        raise NotImplementedError(f"{type(self).__name__} must define transform(self, leaf).")

    @nn.nowrap
    def argument_errors(self) -> list[str]:
        """Problems with the wrapper's own settings, one sentence each (none by default).

        Called when the wrapper is built; the base class then raises one error listing
        these together with its own checks.
        """
        return []

    # -- delegation -----------------------------------------------------------------------

    @nn.compact
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the inner module with transformed variables (when ``__call__`` is delegated)."""
        return self._delegate("__call__", args, kwargs)

    @nn.nowrap
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or "layer_instance" not in self.__dict__:
                raise
        if name in _delegated(self):
            return types.MethodType(_delegating_method(name), self)
        inner = self.__dict__["layer_instance"]
        try:
            value = getattr(inner, name)
        except AttributeError:
            raise AttributeError(
                f"{_describe(self)} has no attribute {name!r}, and neither has the "
                f"{type(inner).__name__} it wraps."
            ) from None
        if inspect.ismethod(value) and isinstance(value.__self__, nn.Module):
            raise AttributeError(
                f"{_describe(self)} does not delegate {name!r}, so calling it would skip the "
                f"wrapper. Build it with delegates={(*self.delegated_methods, name)!r}, or "
                f"call the inner module directly."
            )
        return value

    @nn.nowrap
    def _check_arguments(self) -> None:
        inner = self.layer_instance
        if not isinstance(inner, nn.Module):
            hint = (
                " wrapkit.linen wrappers wrap Linen modules; this is an NNX module."
                if type(inner).__module__.startswith("flax.nnx")
                else ""
            )
            raise TypeError(
                f"{type(self).__name__} expects a flax.linen.Module to wrap, got "
                f"{type(inner).__module__}.{type(inner).__qualname__}.{hint}"
            )
        if isinstance(inner, nn.WeightNorm | nn.SpectralNorm):
            raise TypeError(
                f"{_describe(self)} cannot wrap flax.linen.{type(inner).__name__}: flax's "
                "wrapper keeps the weights it normalises outside its own variables, where "
                f"another wrapper cannot reach them. Use wrapkit.linen.{type(inner).__name__}, "
                "a drop-in with the same arguments and variables."
            )
        if isinstance(inner, Wrapper) and type(inner).__module__ == _LIFTED_CLASSES_MODULE:
            raise TypeError(
                f"{_describe(self)} cannot wrap {type(inner).__name__}, a wrapper lifted by a "
                "flax transform (nn.remat, nn.jit, ...): the outer transform would have to run "
                "inside the inner wrapper's trace. Lift a module around the whole stack "
                f"(nn.remat(Block)), or the outermost wrapper: nn.remat({type(self).__name__})"
                f"({type(inner).__mro__[1].__name__}(...))."
            )
        problems = []
        if isinstance(self.delegates, str):
            problems.append(
                f"delegates must be a sequence of method names, got the string "
                f"{self.delegates!r}; write delegates=({self.delegates!r},)."
            )
        else:
            # A wrapper offers the methods it delegates, whatever its class defines.
            available = _delegated(inner) if isinstance(inner, Wrapper) else _public_methods(inner)
            for name in _delegated(self):
                if name != "__call__" and hasattr(type(self), name):
                    problems.append(
                        f"cannot delegate {name!r}: {type(self).__name__} has an attribute "
                        f"of that name itself."
                    )
                elif name not in available:
                    problems.append(
                        f"delegates {name!r}, but {type(inner).__name__} has no method "
                        f"{name!r}. Delegate one of: {', '.join(available) or '(none)'}."
                    )
        problems += _filters.check(self.variable_filter)
        problems += self.argument_errors()
        if len(problems) == 1:
            raise ValueError(f"{_describe(self)} {problems[0]}")
        if problems:
            raise ValueError(
                f"{_describe(self)} has {len(problems)} problems:\n"
                + "\n".join(f"  - {problem}" for problem in problems)
            )

    @nn.nowrap
    def _take_options(self, method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        options = {}
        for name, default in self._call_options.items():
            if name in kwargs:
                options[name] = kwargs.pop(name)
            elif default is _REQUIRED:
                raise TypeError(
                    f"{_describe(self)}.{method}() needs the keyword argument {name!r}: "
                    f"{type(self).__name__} takes it on every delegated call (it is not "
                    f"passed to {type(self.layer_instance).__name__})."
                )
            else:
                options[name] = default
        return options

    @nn.nowrap
    def _delegate(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if method not in self.delegated_methods:
            raise TypeError(
                f"{_describe(self)} does not delegate {method}; it delegates "
                f"{', '.join(self.delegated_methods)}. Call one of those, or build the "
                f"wrapper with delegates={(*self.delegated_methods, method)!r}."
            )
        options = self._take_options(method, kwargs)
        applied = _Applied(
            self,
            options,
            _filters.compile_filter(self.variable_filter),
            source_info_util.current_name_stack(),
        )
        handoff = _HANDOFF.get()
        outer: tuple[_Applied, ...] = ()
        if handoff is not None and isinstance(self, handoff.receiver):
            handoff.taken, outer = True, handoff.stack
        # Wrappers called from inside this call start without a handoff.
        token = _HANDOFF.set(None)
        try:
            stack = (applied, *outer)
            inner = self.layer_instance
            if isinstance(inner, Wrapper):
                return _hand_down(inner, method, stack, args, kwargs)
            return _call_with_view(inner, method, stack, args, kwargs, self.is_initializing())
        finally:
            _HANDOFF.reset(token)


def _hand_down(
    inner: Wrapper,
    method: str,
    stack: tuple[_Applied, ...],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Calls the wrapped wrapper, which applies ``stack`` after its own transform."""
    handoff = _Handoff(stack, receiver=type(inner))
    token = _HANDOFF.set(handoff)
    try:
        result = getattr(inner, method)(*args, **kwargs)
    finally:
        _HANDOFF.reset(token)
    if not handoff.taken:
        raise RuntimeError(
            f"{_describe(stack[0].wrapper)}: {_describe(inner)}.{method} did not receive the "
            "outer transforms (its delegated method ran on a module of another class, as a "
            "lifted transform does), so they were not applied. Lift a module around the "
            "whole stack instead."
        )
    return result


def _call_with_view(
    inner: nn.Module,
    method: str,
    stack: tuple[_Applied, ...],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    initializing: bool,
) -> Any:
    """Runs ``inner.method`` on a view of its variables transformed by ``stack``."""
    if initializing:
        # Create the inner module's variables with their initial (raw) values; the view
        # below needs them to exist. Flax's WeightNorm stores its normalised view as the
        # raw parameter instead.
        getattr(inner, method)(*args, **kwargs)
    collections = tuple(dict.fromkeys(c for applied in stack for c in applied.wrapper.collections))
    mapped_scopes = 0

    def view(variables: dict[str, Any]) -> dict[str, Any]:
        nonlocal mapped_scopes
        mapped_scopes += 1
        # map_variables maps every module scope the call reaches, the wrapped module's
        # first and then modules passed as arguments; only the first is the wrapped one.
        if mapped_scopes > 1:
            return variables
        return _transform_variables(inner, variables, stack)

    lifted = nn.map_variables(
        getattr(type(inner), method),
        collections,
        trans_in_fn=view,
        init=False,
        mutable=False,
    )
    return lifted(inner, *args, **kwargs)


def _transform_variables(
    inner: nn.Module, variables: dict[str, Any], stack: tuple[_Applied, ...]
) -> dict[str, Any]:
    selected = [0] * len(stack)
    seen: list[tuple[str, str, Any]] = []  # (collection, path, value): for the error only

    def transform_leaf(collection: str, keypath: Any, boxed: Any) -> Any:
        path = f"{inner.name}/{jax.tree_util.keystr(keypath, simple=True, separator='/')}"
        metadata = boxed if isinstance(boxed, AxisMetadata) else None
        value = boxed.unbox() if metadata is not None else boxed
        seen.append((collection, path, value))
        for index, applied in enumerate(stack):
            if collection in applied.wrapper.collections and applied.select(path, value):
                selected[index] += 1
                leaf = Leaf(path, collection, value, metadata)
                with source_info_util.set_name_stack(applied.name_stack):
                    value = applied.wrapper.transform(leaf, **applied.options)
        return metadata.replace_boxed(value) if metadata is not None else value

    out = {
        collection: jax.tree_util.tree_map_with_path(
            functools.partial(transform_leaf, collection),
            tree,
            is_leaf=lambda x: isinstance(x, AxisMetadata),
        )
        for collection, tree in variables.items()
    }
    for count, applied in zip(selected, stack, strict=True):
        if count == 0:
            wrapper = applied.wrapper
            found = ", ".join(f"{c}/{p} {tuple(jax.numpy.shape(v))}" for c, p, v in seen)
            raise ValueError(
                f"{_describe(wrapper)}: variable_filter "
                f"{_filters.describe(wrapper.variable_filter)} selects none of the variables "
                f"of {inner.name} in collections {list(wrapper.collections)}: "
                f"{found or 'it has none'}. Filter strings match whole path "
                "elements ('kernel'; 'Baz' also matches Baz_0), globs ('Dense_*') or are "
                "callables (path, value) -> bool."
            )
    return out
