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
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import flax.linen as nn
import jax
from flax.core import lift, unfreeze
from flax.core.meta import AxisMetadata
from flax.core.scope import subtract_filters
from flax.linen.module import wrap_method_once
from flax.linen.transforms import get_module_scopes, lift_transform

from .. import _filters, _wrapping
from .._filters import VariableFilter
from .._name_stack import current_name_stack, set_name_stack
from .._problems import Unreadable, raise_collected
from .._protocol import check_delegates, unwrap
from .._unmerged import DeltaSource, LowRank, call_unmerged

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


@dataclasses.dataclass(frozen=True)
class Inverse:
    """What a wrapper's [`invert`][wrapkit.linen.Wrapper.invert] returns for one variable.

    Attributes:
        value: the raw value to store where the wrapped module keeps the variable, such
            that ``transform`` of it (with ``variables``) is the value ``invert`` was given.
        variables: the wrapper's own variables for this variable, by collection, named as
            ``transform`` names them: ``{"params": {"Dense_0/kernel/scale": g}}``. Own
            variables left out keep their initial values.
        caveat: when the inverse can be inexact, one sentence saying why (``"SpectralNorm
            reproduces only weights whose largest singular value is 1."``), shown when
            [`wrap_pretrained`][wrapkit.linen.wrap_pretrained] finds the result off. Keep
            it free of array values: ``invert`` may run under ``jax.jit``.
    """

    value: Any
    variables: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    caveat: str | None = None


@dataclasses.dataclass(frozen=True)
class _Seen:
    """A transformed variable as the inner module of a delegated call sees it.

    Given to the recorder that the lifecycle functions (``_lifecycle.py``) set in
    ``_RECORD``; nothing is recorded otherwise.
    """

    path: tuple[str, ...]  # where the variable is in the model's variables, from the root
    collection: str
    chain: tuple[tuple[Wrapper, Leaf], ...]  # each transform, innermost first, with its input
    value: Any  # what the inner module receives, unboxed


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
    select: Callable[[str, Any, bool], bool]
    # The name stack of the wrapper's own call. In a stack, the innermost wrapper runs
    # every transform; each runs under its own wrapper's name stack, so jaxpr-level tools
    # (the summary engine) attribute its equations to the wrapper that owns it.
    name_stack: Any
    # False for a method the wrapper does not delegate: selected variables are unreadable.
    delegated: bool = True


# Set by a wrapper around the call of the wrapper it wraps; read once by that call.
_HANDOFF: contextvars.ContextVar[_Handoff | None] = contextvars.ContextVar(
    "wrapkit_handoff", default=None
)

# Set by the lifecycle functions (_lifecycle.py) around a call whose transforms they record.
_RECORD: contextvars.ContextVar[Callable[[_Seen], None] | None] = contextvars.ContextVar(
    "wrapkit_record", default=None
)

# Set by fold (_lifecycle.py): the view also stores each value it hands an inner module as a
# variable of the wrapper, "__fold__/<collection>/<path from the root>", so that the value
# leaves lifted transforms as flax moves any variable (nn.scan stacks it along its axis).
# The values go to the outermost wrapper whose call is running: inside its view, the scopes of
# wrappers deeper down hold their parameters read-only. A later value of the same variable (a
# wrapper inside a wrapped block, seeing the outer view) replaces an earlier one.
_EXPORT: contextvars.ContextVar[bool] = contextvars.ContextVar("wrapkit_export", default=False)
_EXPORT_TO: contextvars.ContextVar[Wrapper | None] = contextvars.ContextVar(
    "wrapkit_export_to", default=None
)
EXPORTED = "__fold__"


def _export(seen: _Seen) -> None:
    wrapper = _EXPORT_TO.get()
    assert wrapper is not None  # set by _call_with_view while _EXPORT is
    name = "/".join((EXPORTED, seen.collection, *seen.path))
    wrapper.put_variable("params", name, seen.value)


_HOOKS = ("transform", "argument_errors", "low_rank", "delta_feature_axes", "invert")

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
    """A compact Module method named ``name`` that calls the inner module's ``name``.

    Flax names a method call after the function's ``__name__`` (interceptors, named scopes),
    so ``wrapper.encode(x)`` is seen as a call of ``encode`` on the wrapper. Whether the call
    is delegated (transformed variables) or passed through (selected variables unreadable)
    is decided when it runs, from the wrapper's delegated methods.
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
        materialize: bool = False
        freeze_base: bool = False
    else:
        default_delegates = ("__call__",)
        variable_filter = None
        collections = ("params",)
        materialize = False
        freeze_base = False
    _call_options: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # The hooks run once per variable inside a delegated call; keeping them out of
        # flax's method wrapping keeps them out of interceptors and call records too.
        for hook in _HOOKS:
            if hook in cls.__dict__:
                nn.nowrap(cls.__dict__[hook])
        super().__init_subclass__(**kwargs)
        cls._call_options = _wrapping.call_options(cls.transform)

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

    @nn.nowrap
    def invert(self, leaf: Leaf) -> Inverse:
        """The raw value and own variables for which ``transform`` returns ``leaf.value``.

        Used by [`wrap_pretrained`][wrapkit.linen.wrap_pretrained] to wrap a trained model
        without changing its outputs (torch calls this ``right_inverse``). ``leaf`` is the
        variable as ``transform`` receives it, except that ``leaf.value`` is the value
        ``transform`` should *return*. It runs outside any flax call: compute the
        wrapper's own variables and return them (``self.param`` is not available). Where
        no raw value reproduces ``leaf.value``, return the nearest one with a ``caveat``:
        ``wrap_pretrained`` checks the result and raises unless told to accept it. Without
        this hook a wrapper cannot wrap pretrained weights.
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot be inverted: it defines no invert(self, leaf) "
            "returning the raw value (and its own variables) for which transform gives "
            "leaf.value."
        )

    @nn.nowrap
    def low_rank(
        self,
        leaf: Leaf,
        input_axes: tuple[int, ...],
        output_axes: tuple[int, ...],
        shared_axes: tuple[int, ...] = (),
    ) -> LowRank:
        """The low-rank delta ``s * A @ B`` this wrapper adds to one selected variable.

        A wrapper that defines this hook instead of ``transform`` changes a weight ``W``
        into ``W + s * A @ B``, and its delegated calls run in *unmerged* form: every linear
        use of ``W`` in the inner call (``x @ W``, a convolution, a row lookup) becomes
        ``f(x; W) + s * f(x; A @ B)`` with ``f(x; A @ B)`` computed through the factors, so
        neither ``A @ B`` nor a full-size gradient of it is ever computed (see
        [`LoRA`][wrapkit.linen.LoRA]). A use without an unmerged form raises, unless the
        wrapper's ``materialize`` is true.

        Args:
            leaf: the variable, as for ``transform``.
            input_axes: the variable's axes that its first use contracts with the input
                (or indexes, for a lookup), sorted.
            output_axes: its other axes, sorted.
            shared_axes: axes the use batches over, such as the expert axis of an
                ``"ebd,edh->ebh"`` Einsum kernel (usually none): each slice along them
                gets a delta of its own.

        Returns:
            The factors: ``a`` of shape ``(*shared axes, *input axes, rank)``, ``b`` of shape
            ``(*shared axes, rank, *output axes)``, with ``shared=len(shared_axes)``. The hook
            may create them with ``self.param``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not define low_rank.")

    @nn.nowrap
    def delta_feature_axes(self, leaf: Leaf) -> tuple[int, ...] | None:
        """The output axes of ``leaf`` for ``low_rank``, or ``None`` to infer them from its
        first use (the axes that use does not contract)."""
        return None

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
        inner = self.__dict__["layer_instance"]
        if name in _delegated(self):
            return types.MethodType(_delegating_method(name), self)
        try:
            value = getattr(inner, name)
        except AttributeError:
            raise _wrapping.no_attribute(_describe(self), name, type(inner).__name__) from None
        if inspect.ismethod(value) and isinstance(value.__self__, nn.Module):
            # Not delegated: the method runs on the inner module with every variable this
            # wrapper would transform made unreadable, so a method that needs no selected
            # variable (an RNN cell's initialize_carry) works, and one that reads them
            # raises instead of silently using raw weights.
            return types.MethodType(_delegating_method(name), self)
        if any(isinstance(leaf, nn.Module) for leaf in jax.tree_util.tree_leaves(value)):
            raise AttributeError(
                f"{_describe(self)}: {name!r} is a submodule of the {type(inner).__name__} it "
                "wraps; called through the wrapper it would run on untransformed weights. "
                f"Delegate a method of {type(inner).__name__} that calls it (delegates=...), "
                "or wrap that submodule itself."
            )
        return value

    @nn.nowrap
    def _check_arguments(self) -> None:
        inner = self.layer_instance
        if isinstance(inner, type) and issubclass(inner, nn.Module):
            raise TypeError(
                f"{type(self).__name__} expects a flax.linen.Module instance to wrap, got the "
                f"class {inner.__module__}.{inner.__qualname__}. Build the module first: "
                f"{type(self).__name__}({inner.__name__}(...))."
            )
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
            wrapped_class: type[Wrapper] = type(inner).__mro__[1]
            # flax's lifted transforms trace keyword arguments, so lifting the outermost
            # wrapper only works when no wrapper in the stack takes a call option.
            options = self._call_options or wrapped_class._call_options
            outermost = (
                ""
                if options
                else f", or the outermost wrapper: nn.remat({type(self).__name__})"
                f"({wrapped_class.__name__}(...))"
            )
            raise TypeError(
                f"{_describe(self)} cannot wrap {type(inner).__name__}, a wrapper lifted by a "
                "flax transform (nn.remat, nn.jit, ...): the outer transform would have to run "
                "inside the inner wrapper's trace. Lift a module around the whole stack "
                f"(nn.remat(Block), where Block builds {type(self).__name__}("
                f"{wrapped_class.__name__}(...))){outermost}."
            )
        problems = (
            check_delegates(self.delegates, "delegates") if self.delegates is not None else []
        )
        if not problems:
            available = _delegated(inner) if isinstance(inner, Wrapper) else _public_methods(inner)
            problems += _wrapping.delegation_problems(
                type(self), _delegated(self), type(inner).__name__, available
            )
        problems += _filters.check(self.variable_filter)
        problems += self.argument_errors()
        raise_collected(_describe(self), problems, ValueError)

    @nn.nowrap
    def _read_options(self, method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """This wrapper's call options, read (not removed) from the call's keywords.

        In a stack every wrapper reads its own options from the same keywords, so two
        wrappers taking ``update_stats`` both receive it; the innermost wrapper removes all
        of them before it calls the wrapped module.
        """
        return _wrapping.read_options(
            _describe(self),
            type(self).__name__,
            type(unwrap(self)).__name__,
            self._call_options,
            method,
            kwargs,
        )

    @nn.nowrap
    def _delegate(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        delegated = method in self.delegated_methods
        applied = _Applied(
            self,
            self._read_options(method, kwargs) if delegated else {},
            _filters.compile_filter(self.variable_filter),
            current_name_stack(),
            delegated,
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
            taken = {name for entry in stack for name in entry.options}
            kwargs = {name: value for name, value in kwargs.items() if name not in taken}
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
    """Runs ``inner.method`` on a view of its variables transformed by ``stack``.

    The view covers every scope the call can reach: the inner module's own (with the
    modules it defines in ``setup`` or ``@nn.compact``), modules it holds as dataclass
    fields (passed in by a parent: ``nn.Sequential``'s layers, ``nn.Bidirectional``'s
    RNNs, shared instances) and modules passed as arguments of the call.
    """
    if initializing:
        # Create the inner module's variables with their initial (raw) values; the view
        # below needs them to exist. Flax's WeightNorm stores its normalised view as the
        # raw parameter instead.
        getattr(inner, method)(*args, **kwargs)
    collections = tuple(dict.fromkeys(c for applied in stack for c in applied.wrapper.collections))
    view = _View(inner, method, stack, _mapped_scope_names(inner, args, kwargs))
    if any(applied.delegated and _adds_low_rank(applied.wrapper) for applied in stack):
        lifted = lift_transform(
            _map_variables_unmerged, getattr(type(inner), method), collections, view
        )
    else:
        lifted = nn.map_variables(
            getattr(type(inner), method),
            collections,
            trans_in_fn=view,
            init=False,
            mutable=False,
        )
    exporting = _EXPORT.get() and _EXPORT_TO.get() is None
    token = _EXPORT_TO.set(stack[0].wrapper) if exporting else None
    try:
        result = lifted(inner, *args, **kwargs)
        if (record := _RECORD.get()) is not None:
            for seen, source in view.merged:
                if source.low_rank is not None:  # else no use made the factors
                    seen = dataclasses.replace(seen, value=source.merged(seen.value))
                record(seen)
                if _EXPORT.get():
                    _export(seen)
    finally:
        if token is not None:
            _EXPORT_TO.reset(token)
    if view.mapped != len(view.names):
        # The names are matched to the trees by position; a different count would misname
        # them, so fail loudly instead (a flax version that maps scopes differently).
        raise RuntimeError(
            f"wrapkit bug: nn.map_variables mapped {view.mapped} variable trees for "
            f"{type(inner).__name__}.{method}, where wrapkit expected {len(view.names)} "
            f"({', '.join(view.names)}). Please report it with your flax version."
        )
    return result


def _adds_low_rank(wrapper: Wrapper) -> bool:
    return type(wrapper).low_rank is not Wrapper.low_rank


def _delta_source(applied: _Applied, leaf: Leaf) -> DeltaSource:
    wrapper = applied.wrapper
    feature_axes = wrapper.delta_feature_axes(leaf)
    return DeltaSource(
        describe=f"{_describe(wrapper)}: {leaf.collection}/{leaf.path}",
        make=lambda input_axes, output_axes, shared_axes: wrapper.low_rank(
            leaf, input_axes, output_axes, shared_axes, **applied.options
        ),
        name_stack=applied.name_stack,
        materialize=wrapper.materialize,
        feature_axes=feature_axes,
        freeze=wrapper.freeze_base,
    )


def _map_variables_unmerged(
    fn: Callable[..., Any], mapped_collections: Sequence[str], view: _View
) -> Callable[..., Any]:
    """``nn.map_variables(fn, mapped_collections, trans_in_fn=view)``, with low-rank deltas.

    The same lifted transform as flax's read-only ``map_variables``, except that the inner
    call is traced once and evaluated by ``call_unmerged``, which applies the deltas of
    the variables in ``view.sources`` in unmerged form.
    """

    def inner(
        scope_fn: Any, repack: Any, variable_groups: Any, rng_groups: Any, *args: Any, **kwargs: Any
    ) -> Any:
        target, variables = variable_groups
        target = tuple(view(unfreeze(group)) for group in target)
        writable = subtract_filters(True, mapped_collections)

        def body(target: Any, variables: Any, rng_groups: Any, args: Any, kwargs: Any) -> Any:
            scopes = scope_fn((target, variables), rng_groups, mutable_filter=writable)
            result = fn(scopes, *args, **kwargs)
            return result, repack(scopes)

        return call_unmerged(body, [target, variables, rng_groups, args, kwargs], view.sources)

    return lift.pack(
        inner,
        (mapped_collections, True),
        (False, subtract_filters(True, mapped_collections)),
        (True,),
        enable_kwargs=True,
        name="map_variables",
    )


def _mapped_scope_names(
    inner: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[str, ...]:
    """How variables are named in each scope ``nn.map_variables`` maps for ``inner``.

    ``nn.map_variables`` calls its view function once per scope, in the order of flax's
    ``get_module_scopes`` (modules in call arguments, then modules in dataclass fields,
    depth first, then the module's own scope), leaving out scopes that lie inside another
    listed scope (they are mapped as part of it). There is no public API for this list;
    ``tests/test_scopes.py`` pins it.

    Names are relative to the inner module's parent, so the inner module's own variables
    are ``"<inner name>/<path>"`` (flax's names, which checkpoints depend on) and a sibling
    passed in as a field is ``"<its name>/<path>"``. A scope elsewhere in the model (a
    module shared from another branch) is named by its absolute path, with a leading ``/``.
    """
    scopes, _, _ = get_module_scopes(inner, args, kwargs)
    listed = set(scopes)

    def inside_another(scope: Any) -> bool:
        parent = scope.parent
        while parent is not None:
            if parent in listed:
                return True
            parent = parent.parent
        return False

    base = tuple(inner.path[:-1])
    names = []
    for scope in dict.fromkeys(scopes):
        if inside_another(scope):
            continue
        path = tuple(scope.path)
        if path[: len(base)] == base and len(path) > len(base):
            names.append("/".join(path[len(base) :]))
        else:
            names.append("/" + "/".join(path))
    return tuple(names)


def _variable_scope(inner: nn.Module, scope_name: str) -> tuple[str, ...]:
    """The path from the root of the scope that ``_mapped_scope_names`` named ``scope_name``."""
    if scope_name.startswith("/"):
        return tuple(part for part in scope_name[1:].split("/") if part)
    return (*inner.path[:-1], *scope_name.split("/"))


class _View:
    """The ``trans_in_fn`` of a delegated call: called once per mapped scope, in order."""

    def __init__(
        self, inner: nn.Module, method: str, stack: tuple[_Applied, ...], names: tuple[str, ...]
    ) -> None:
        self.inner, self.method, self.stack, self.names = inner, method, stack, names
        self.mapped = 0
        self.selected = [0] * len(stack)
        # Variables that take a low-rank delta in unmerged form, by the id of the value
        # the view hands to the inner call (see _map_variables_unmerged).
        self.sources: dict[int, DeltaSource] = {}
        self.weights: list[Any] = []  # keeps the ids above unique while the call runs
        self.merged: list[tuple[_Seen, DeltaSource]] = []  # for _RECORD, after the call
        self.seen: list[tuple[str, str, Any]] = []  # (collection, path, value): errors only

    def __call__(self, variables: dict[str, Any]) -> dict[str, Any]:
        name = self.names[self.mapped % len(self.names)]
        self.mapped += 1
        out = {
            collection: jax.tree_util.tree_map_with_path(
                functools.partial(self._leaf, name, collection),
                tree,
                is_leaf=lambda x: isinstance(x, AxisMetadata),
            )
            for collection, tree in variables.items()
        }
        if self.mapped % len(self.names) == 0:
            self._check_selected()
        return out

    def _leaf(self, scope_name: str, collection: str, keypath: Any, boxed: Any) -> Any:
        path = f"{scope_name}/{jax.tree_util.keystr(keypath, simple=True, separator='/')}"
        # Flax's and wrapkit's wrappers name their own variables "<module>/<path>/scale";
        # module and variable names never contain "/".
        owned = any("/" in str(getattr(key, "key", "")) for key in keypath)
        metadata = boxed if isinstance(boxed, AxisMetadata) else None
        value = boxed.unbox() if metadata is not None else boxed
        self.seen.append((collection, path, value))
        factored: _Applied | None = None
        chain: list[tuple[Wrapper, Leaf]] = []
        for index, applied in enumerate(self.stack):
            if collection not in applied.wrapper.collections:
                continue
            if not applied.select(path, value, owned):
                continue
            self.selected[index] += 1
            if not applied.delegated:
                return Unreadable(
                    _wrapping.not_delegated(
                        _describe(applied.wrapper),
                        type(applied.wrapper).__name__,
                        self.method,
                        type(self.inner).__name__,
                        f"{collection}/{path}",
                        applied.wrapper.delegated_methods,
                    )
                )
            leaf = Leaf(path, collection, value, metadata)
            chain.append((applied.wrapper, leaf))
            if factored is not None:
                raise ValueError(
                    f"{_describe(applied.wrapper)} transforms {collection}/{path} after "
                    f"{_describe(factored.wrapper)} has added its low-rank delta to it: "
                    f"{type(applied.wrapper).__name__} of W + s * A @ B has no unmerged form. "
                    f"Put {type(factored.wrapper).__name__} outermost "
                    f"({type(factored.wrapper).__name__}({type(applied.wrapper).__name__}"
                    "(...))), or leave the variable out of one of the two filters."
                )
            if _adds_low_rank(applied.wrapper):
                factored = applied
                continue
            with set_name_stack(applied.name_stack):
                value = applied.wrapper.transform(leaf, **applied.options)
        if factored is not None:
            value = jax.numpy.asarray(value)
            leaf = Leaf(path, collection, value, metadata)
            self.sources[id(value)] = _delta_source(factored, leaf)
            self.weights.append(value)
        if chain and (record := _RECORD.get()) is not None:
            full_path = (*_variable_scope(self.inner, scope_name), *(k.key for k in keypath))
            seen = _Seen(full_path, collection, tuple(chain), value)
            if factored is None:
                record(seen)
                if _EXPORT.get():
                    _export(seen)
            else:
                # Reported once the call has made the delta's factors, with the merged
                # value W + s * A @ B (what fold needs).
                self.merged.append((seen, self.sources[id(value)]))
        return metadata.replace_boxed(value) if metadata is not None else value

    def _check_selected(self) -> None:
        for count, applied in zip(self.selected, self.stack, strict=True):
            if count == 0 and applied.delegated:
                wrapper = applied.wrapper
                found = ", ".join(f"{c}/{p} {tuple(jax.numpy.shape(v))}" for c, p, v in self.seen)
                raise ValueError(
                    f"{_describe(wrapper)}: variable_filter "
                    f"{_filters.describe(wrapper.variable_filter)} selects none of the "
                    f"variables that {type(self.inner).__name__}.{self.method} can reach in "
                    f"collections {list(wrapper.collections)}: {found or 'it has none'}. "
                    "Filter strings match whole path elements ('kernel'; 'Baz' also matches "
                    "Baz_0), globs ('Dense_*') or are callables (path, value) -> bool; they "
                    "never select another wrapper's own variables (.../kernel/scale)."
                )
        self.selected = [0] * len(self.stack)
        self.seen = []
