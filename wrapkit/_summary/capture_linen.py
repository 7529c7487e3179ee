"""The Linen front end of the summary: record Linen module calls, locate their variables.

Module method calls are recorded through ``nn.intercept_methods``; the engine
(``engine.py``) traces, marks, attributes and counts. This file says what is Linen's: which
calls get rows, where each call's variables are (a nested ``Module.apply`` has its own
variable tree), and the abstract init that makes the variables (``jax.eval_shape``).
Nothing is allocated or run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, cast

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta
from flax.core.scope import Scope

from .. import _calls
from .._protocol import delegated_methods, is_wrapper
from . import engine
from .data import Summary, VariableStats
from .engine import abstract as _abstract
from .engine import is_method as _is_method


@dataclasses.dataclass
class _Call(engine.Call):
    """A Linen module method call: where its variables are, and what the recorder checks."""

    # Which variable tree the call's variables are in (0: the model's; others: those passed
    # to a ``Module.apply`` made inside the model), and the module's path inside that tree.
    tree: int = 0
    prefix: tuple[str, ...] = ()
    local_path: tuple[str, ...] = ()
    module_id: int = 0
    module_class: type = object
    root_scope_id: int = 0


class _Recorder(engine.Recorder):
    """An ``nn.intercept_methods`` interceptor that builds the call tree.

    A call that is not a method of its module (flax's lifted ``layer_forward``, the
    ``<lambda>`` of nn.scan / nn.remat ...), a private helper (flax's WeightNorm
    ``_l2_normalize``), ``setup``, a lifted transform's copy of its caller's call, or (by
    default) a helper method a module calls on itself is transparent: its cost and callees
    are its caller's.
    """

    def __init__(self, mark: bool, helpers: bool = False, initialised: bool = False) -> None:
        super().__init__(mark)
        self.helpers = helpers
        # The model's variables come from wrapkit's own abstract init of the same call: the
        # scopes of the model's own variable tree may skip flax's re-check of their shapes.
        self.initialised = initialised
        self.model_root: int | None = None
        # id(root scope) -> (the scope, kept alive so that its id stays unique; tree; prefix)
        self.scopes: dict[int, tuple[Any, int, tuple[str, ...]]] = {}
        # The variables of each ``Module.apply`` made inside the model; 0 is the model's.
        self.trees: list[Any] = [None]

    def __call__(self, next_fun: Callable[..., Any], args: Any, kwargs: Any, context: Any) -> Any:
        module = context.module
        self.probing = f"{type(module).__name__}.{context.method_name}"
        call = self._record(module, context.method_name, args, kwargs)
        if self.model_root is None:
            self.model_root = call.root_scope_id
        if self.initialised and call.root_scope_id == self.model_root:
            _reuse_initialised_shapes(module.scope)
        self.probing = None
        return self.run(call, next_fun, args, kwargs)

    def diverted(self, module: Any) -> None:
        """The call being recorded for ``module`` runs a wrapper instead (``inject``): its
        row is the wrapper's, and the module's own call inside the wrapper."""
        caller = self.caller
        if isinstance(caller, _Call) and caller.module_id == id(module):
            caller.transparent = True

    def _record(self, module: nn.Module, method: str, args: Any, kwargs: Any) -> _Call:
        # Only the class is read, never the instance's attributes through getattr: model
        # libraries define ``__getattr__`` (forwarding to a config), which would re-enter
        # user code from inside the interceptor.
        cls = type(module)
        wrapper = is_wrapper(module)
        # Every call on this recorder is a Linen one.
        parent = cast("_Call | None", self.caller)
        visible = cast("_Call | None", self.visible_caller)
        tree, prefix, local, nested, root_id = self._locate(module, parent)
        path = prefix + local
        # flax's lifted class (``JitBlock``) subclasses the user's (``Block``).
        lifted_copy = (
            visible is not None
            and (visible.path, visible.method) == (path, method)
            and issubclass(visible.module_class, cls)
        )
        if lifted_copy and visible is not None:
            visible.module_type = cls.__name__
        transparent = (
            method == "setup"
            or _calls.is_transparent(cls)
            or (method.startswith("_") and not method.startswith("__"))
            or not (
                _is_method(cls, method)
                # A wrapper's per-instance delegates are its methods too.
                or (wrapper and method in delegated_methods(module))
            )
            # A lifted transform (nn.jit, nn.remat of a class ...) calls the same method of
            # its copy of the module: one call, one row.
            or lifted_copy
            # A helper method the module calls on itself is part of its caller's work.
            or (not self.helpers and visible is not None and visible.module_id == id(module))
        )
        call = _Call(
            id=engine.new_call_id(),
            path=path,
            module_type=cls.__name__,
            method=method,
            wrapper=wrapper,
            inputs=_abstract((args, kwargs)),
            transparent=transparent,
            tree=tree,
            prefix=prefix,
            local_path=local,
            nested=nested,
            module_id=id(module),
            module_class=cls,
            root_scope_id=root_id,
        )
        self.add(call)
        return call

    def _locate(
        self, module: nn.Module, parent: _Call | None
    ) -> tuple[int, tuple[str, ...], tuple[str, ...], bool, int]:
        """(tree, path prefix, path in the tree, top of a nested apply, id of the root scope).

        Each ``Module.apply`` and each lifted transform makes a new root scope. A lifted
        transform's scope keeps the module's path (and a debug path naming the transform);
        a ``Module.apply`` made inside the model (a tied LM head's
        ``self.head.apply({"params": {"kernel": embedding.T}}, x)``) starts a variable tree
        of its own at path ``()``: its calls are placed under the calling module's path,
        and their variables are looked up in the variables passed to that apply.
        """
        scope = module.scope
        inherited = (parent.tree, parent.prefix) if parent is not None else (0, ())
        if scope is None:
            return *inherited, (), False, 0
        root = scope.root
        local = tuple(scope.path)
        known = self.scopes.get(id(root))
        if known is not None:
            return known[1], known[2], local, False, id(root)
        nested = (
            parent is not None
            and parent.root_scope_id != id(root)
            and not local
            and not scope.debug_path
        )
        if nested and parent is not None:
            tree = len(self.trees)
            self.trees.append(_abstract(scope.variables()))
            prefix = parent.path + (module.name or type(module).__name__,)
        else:
            tree, prefix = inherited
        self.scopes[id(root)] = (root, tree, prefix)
        return tree, prefix, local, nested, id(root)


def summary(
    module: Any,
    *args: Any,
    rngs: Any = None,
    variables: Any = None,
    method: str | Callable[..., Any] | None = None,
    mutable: Any = False,
    vjp: bool = False,
    helpers: bool = False,
    **kwargs: Any,
) -> Summary:
    """Summarises a Linen or NNX module call: shapes, variables and FLOPs of every module call.

    One abstract trace of ``module.apply(variables, *args, **kwargs)`` (Linen) or of the
    module's method through ``nnx.split``/``nnx.merge`` (NNX) records each module method
    call; every equation of the traced program is attributed to the call that
    issued it and counted with [`wrapkit.flops`][wrapkit.flops.count]'s rules. Nothing is
    allocated or run, so inputs and variables may be ``jax.ShapeDtypeStruct``s and the
    model may be far larger than memory.

    Wrappers are seen through: a wrapper's row holds the cost of its variable transform,
    and the inner module is its child, with its real path and the delegated method's name.

    An NNX module may be concrete or built with ``nnx.eval_shape``; it is neither run nor
    changed. Its rows' paths are attribute paths (``blocks/0/attn``), its variables are
    grouped by Variable type (``Param``, ``BatchStat``, ``RngState`` ...), its state after
    the call (BatchNorm's statistics, RNG counts) is counted, and its VJP is taken with
    respect to the Params and the floating-point inputs.

    Args:
        module: the Linen or NNX module to summarise.
        *args: positional arguments of the call: arrays or ``jax.ShapeDtypeStruct``s (other
            values are passed through as static Python values).
        rngs: PRNG keys as for ``Module.init``/``apply``: a key or a dict of keys, concrete
            or abstract. Values never matter to an abstract trace; by default a ``params``
            key is used, which flax also hands to other streams (``dropout`` ...). A dict
            without ``params`` gets an abstract one added, which initialisation needs.
            For an NNX module, ``rngs`` is passed to the method (NNX's convention).
        variables: the module's variables, concrete or abstract, to skip initialisation.
            By default they are made abstractly with ``jax.eval_shape(module.init, ...)``.
            Linen only.
        method: the method to call, a name or a function, as in ``Module.apply``.
        mutable: collections the call may update, as in ``Module.apply``. Linen only.
        vjp: also count the whole model's VJP (forward and backward with respect to the
            floating-point variables and inputs), per call.
        helpers: give a row to each helper method a module calls on itself
            (``self.split_heads(x)``). By default such a call is part of its caller's
            row, costs included; calls on other modules always have rows.
        **kwargs: keyword arguments of the call.

    Returns:
        A [`Summary`][wrapkit.Summary]: one row per module method call.

    Raises:
        TypeError: ``module`` is neither a Linen nor an NNX module; ``variables`` or
            ``mutable`` given for an NNX module; an NNX ``method`` name it does not have.
        ValueError: the trace failed (wrong input shapes or dtypes ...); the message says
            whether initialising, applying or differentiating failed, and names the module
            path and method where it failed. The original error is chained.

    Examples:
        >>> import flax.linen as nn, jax, jax.numpy as jnp, wrapkit
        >>> x = jax.ShapeDtypeStruct((8, 3), jnp.float32)
        >>> table = wrapkit.summary(wrapkit.linen.WeightNorm(nn.Dense(4)), x)
        >>> for row in table:
        ...     print(row.depth, row.module_type, row.own_flops, row.flops)
        0 WeightNorm 48 272
        1 Dense 224 224
        >>> from flax import nnx
        >>> linear = nnx.eval_shape(lambda: nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
        >>> wrapkit.summary(linear, x, vjp=True)
        Summary(Linear, 1 call, flops=224, vjp_flops=636)
    """
    if not isinstance(module, nn.Module):
        if _is_nnx_module(module):
            return _nnx_summary(
                module, args, kwargs, rngs, variables, method, mutable, vjp, helpers
            )
        raise TypeError(
            f"wrapkit.summary expects a flax.linen.Module, got {type(module).__name__}. "
            "It also takes a flax.nnx.Module."
        )
    with engine.cyclic_gc_paused():
        return _summary(module, args, kwargs, rngs, variables, method, mutable, vjp, helpers)


def _is_nnx_module(module: Any) -> bool:
    # flax.nnx takes seconds to import: a model can only be an NNX one once it is imported.
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(module, nnx.Module)


def _nnx_summary(
    module: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    rngs: Any,
    variables: Any,
    method: str | Callable[..., Any] | None,
    mutable: Any,
    vjp: bool,
    helpers: bool,
) -> Summary:
    """An NNX module's summary (``capture_nnx``); ``rngs`` goes to the call, as NNX's own
    methods take it, and the Linen-only arguments are refused."""
    given = [
        name
        for name, value, default in (("variables", variables, None), ("mutable", mutable, False))
        if value is not default
    ]
    if given:
        raise TypeError(
            f"wrapkit.summary of the NNX module {type(module).__name__}: "
            f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} Linen's "
            "(an NNX module holds its own state, and every update is counted). Leave "
            f"{'it' if len(given) == 1 else 'them'} out."
        )
    from .capture_nnx import summary as nnx_summary

    if rngs is not None:
        kwargs = {**kwargs, "rngs": rngs}
    return nnx_summary(module, *args, method=method, vjp=vjp, helpers=helpers, **kwargs)


def _summary(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    rngs: Any,
    variables: Any,
    method: str | Callable[..., Any] | None,
    mutable: Any,
    vjp: bool,
    helpers: bool,
) -> Summary:
    rngs = _prepare_rngs(rngs)
    dynamic, rebuild = engine.split_static((args, kwargs))

    initialised = variables is None
    if initialised:

        def init(rngs: Any, dynamic: Any, recorder: _Recorder | None = None) -> Any:
            call_args, call_kwargs = rebuild(dynamic)
            with nn.intercept_methods(recorder) if recorder else contextlib.nullcontext():
                return module.init(rngs, *call_args, method=method, **call_kwargs)

        try:
            variables = jax.eval_shape(init, rngs, dynamic)
        except Exception as error:
            # Only now pay for recording the calls: trace again to find where it failed.
            recorder = _Recorder(mark=False)
            with contextlib.suppress(Exception):
                jax.eval_shape(functools.partial(init, recorder=recorder), rngs, dynamic)
            raise engine.trace_error(
                type(module).__name__, recorder, "initialising", error, _hint(error)
            ) from error
    variables = _abstract(variables)
    inputs, treedef = jax.tree_util.tree_flatten((variables, rngs, dynamic))
    front = _Linen(module, method, mutable, helpers, initialised, variables, (args, kwargs))
    front.treedef, front.rebuild = treedef, rebuild
    return engine.summarise(front, inputs, vjp)


class _Linen:
    """The engine's ``FrontEnd`` for one Linen summary: ``module.apply`` under the
    recorder, and the variables of each call in the (abstract) variable trees."""

    treedef: Any
    rebuild: Callable[[list[Any]], Any]

    def __init__(
        self,
        module: nn.Module,
        method: str | Callable[..., Any] | None,
        mutable: Any,
        helpers: bool,
        initialised: bool,
        variables: Any,
        call: tuple[tuple[Any, ...], dict[str, Any]],
    ) -> None:
        self.module = module
        self.name = type(module).__name__
        self.method = method
        self.mutable = mutable
        self.helpers = helpers
        self.initialised = initialised
        self.model_variables = variables
        self.call = call

    def recorder(self) -> _Recorder:
        return _Recorder(mark=True, helpers=self.helpers, initialised=self.initialised)

    def differentiable(self, leaves: Sequence[Any]) -> list[bool]:
        # Every floating-point variable (of every collection) and input.
        return [jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in leaves]

    def apply(self, recorder: engine.Recorder, *leaves: Any) -> tuple[Any, Any]:
        linen = cast(_Recorder, recorder)  # made by self.recorder
        variables, rngs, dynamic = jax.tree_util.tree_unflatten(self.treedef, leaves)
        call_args, call_kwargs = self.rebuild(dynamic)
        with nn.intercept_methods(linen), _calls.listening(linen.diverted):
            result = self.module.apply(
                variables,
                *call_args,
                rngs=rngs,
                method=self.method,
                mutable=self.mutable,
                **call_kwargs,
            )
        # With ``mutable``, apply returns (output, updated variables).
        return result if self.mutable is not False else (result, {})

    def top(self, calls: list[engine.Call]) -> engine.Call:
        wrapper = is_wrapper(self.module)
        return engine.top_call(self.name, self.method, wrapper, _abstract(self.call), calls)

    def variables(
        self, recorder: engine.Recorder, calls: Sequence[engine.Call]
    ) -> list[Mapping[str, VariableStats]]:
        trees = [self.model_variables, *cast(_Recorder, recorder).trees[1:]]
        linen_calls = [cast(_Call, call) for call in calls]  # recorded by a _Recorder
        paths = {(call.tree, call.local_path) for call in linen_calls}
        return [
            _own_variables(trees[call.tree], call.tree, call.local_path, paths)
            for call in linen_calls
        ]

    def totals(self) -> tuple[tuple[str, ...], Mapping[str, VariableStats]]:
        variables = self.model_variables
        return tuple(variables), {name: VariableStats.of(tree) for name, tree in variables.items()}

    def hint(self, error: Exception) -> str:
        return _hint(error)


def _prepare_rngs(rngs: Any) -> dict[str, Any]:
    if rngs is not None and not isinstance(rngs, Mapping):
        return {"params": rngs}
    if isinstance(rngs, Mapping) and "params" in rngs:
        return dict(rngs)
    # flax's init needs a ``params`` stream; the values never matter to an abstract trace.
    params = jax.eval_shape(lambda: jax.random.key(0))
    return {"params": params, **(rngs or {})}


def _reuse_initialised_shapes(scope: Scope | None) -> None:
    """Lets ``scope`` return its existing parameters without tracing their initialisers again.

    flax's ``Scope.param`` checks each parameter that exists against ``jax.eval_shape`` of
    its initialiser, one trace per parameter: about a tenth of a GPT-2 summary's time. Called
    only for the scopes of the model's own variable tree when wrapkit made those variables
    itself, with ``jax.eval_shape(module.init, ...)`` on the same module, method and inputs:
    there every shape already is what its initialiser returned. Variables passed in by the
    user, those of a ``Module.apply`` inside the model, and the scopes of lifted transforms
    (which map variables on their way in) keep flax's check. Only this scope object, which
    flax makes for this one ``apply`` and discards after it, is changed, never flax's class;
    a parameter that does not exist yet goes to flax's own method.
    """
    if type(scope) is not Scope or "param" in vars(scope):
        return

    def param(
        name: str,
        init_fn: Callable[..., Any],
        *init_args: Any,
        unbox: bool = True,
        **init_kwargs: Any,
    ) -> Any:
        if not scope.has_variable("params", name):
            return Scope.param(scope, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
        scope.reserve(name, "params")  # as flax does: a name is declared once
        value = scope.get_variable("params", name)
        return meta.unbox(value) if unbox else value

    scope.param = param  # type: ignore[method-assign]


def _hint(error: Exception) -> str:
    """Advice for errors about shapes and dtypes; flax's other errors explain themselves."""
    if isinstance(error, flax.errors.ScopeParamShapeError):
        return "\nCheck the input shapes against the shapes of the given variables."
    if isinstance(error, flax.errors.FlaxError):
        return ""
    if isinstance(error, TypeError | ValueError):
        return "\nCheck the input shapes and dtypes against what this module expects."
    return ""


def _own_variables(
    variables: Mapping[str, Any],
    tree: int,
    path: tuple[str, ...],
    paths: set[tuple[int, tuple[str, ...]]],
) -> Mapping[str, VariableStats]:
    """The variables at ``path`` of variable tree ``tree``, without those of submodules
    that have their own rows."""
    own = {}
    for collection, values in variables.items():
        for name in path:
            if not isinstance(values, Mapping) or name not in values:
                values = None
                break
            values = values[name]
        if values is None:
            continue
        if isinstance(values, Mapping):
            values = {
                key: value for key, value in values.items() if (tree, path + (key,)) not in paths
            }
        stats = VariableStats.of(values)
        if stats.count:
            own[collection] = stats
    return MappingProxyType(own)
