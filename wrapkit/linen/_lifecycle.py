"""The lifecycle of a wrapped Linen model: fold, wrap a pretrained model, data-dependent init.

Each function runs the model once under ``jax.jit`` with a recorder set in the wrapper
machinery (``_wrapper._RECORD``): every delegated call reports each variable it
transformed, where the variable lives, the wrappers that transformed it (innermost first)
and the value the inner module received. From that record:

- ``fold`` writes each received value where the raw one was, drops the wrappers' own
  variables, and moves an inner module that a wrapper owns (a wrapper built in ``setup`` or
  at the top keeps it at ``<wrapper>/layer_instance``) to the wrapper's place, which is
  where the model built without wrappers keeps it;
- ``wrap_pretrained`` maps the plain model's variables the other way, inverts each
  transformed one through the wrappers' ``invert`` hooks (outermost first), and checks the
  result by folding it;
- ``init_from_data`` also intercepts each WeightNorm call, measures its output on the
  batch and hands the layers downstream the normalised output, which is what the
  data-initialised layer computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze
from flax.core.meta import AxisMetadata

from .. import _wrapping
from .._problems import raise_collected
from ._weight_norm import WeightNorm
from ._wrapper import _EXPORT, _RECORD, EXPORTED, Inverse, Leaf, Wrapper, _describe, _Seen

_Path = tuple[str, ...]
_Key = tuple[str, ...]  # (collection, *path)
_SHOWN = 6  # paths an error lists before "and N more"
_ARRAYS = (jax.Array, np.ndarray, jax.ShapeDtypeStruct)


# -- variables as flat dicts ------------------------------------------------------------


def _flatten(variables: Mapping[str, Any]) -> dict[_Key, Any]:
    """``{(collection, *path): leaf}``; a box (``nn.Partitioned``) is one leaf."""
    return traverse_util.flatten_dict(unfreeze(dict(variables)))


def _unflatten(flat: Mapping[_Key, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict(dict(flat))


def _unbox(leaf: Any) -> Any:
    return leaf.unbox() if isinstance(leaf, AxisMetadata) else leaf


def _like(leaf: Any, value: Any) -> Any:
    """``value`` in ``leaf``'s dtype and, where ``leaf`` is boxed, in its box."""
    value = jnp.asarray(value, jnp.result_type(_unbox(leaf)))
    return leaf.replace_boxed(value) if isinstance(leaf, AxisMetadata) else value


def _name(key: _Key) -> str:
    return "/".join(key)


def _where(path: _Path) -> str:
    return f"at {'/'.join(path)!r}" if path else "at the top"


def _listed(keys: list[_Key], shapes: Mapping[_Key, Any] | None = None) -> str:
    def one(key: _Key) -> str:
        shape = "" if shapes is None else f" {tuple(jnp.shape(_unbox(shapes[key])))}"
        return _name(key) + shape

    shown = ", ".join(one(key) for key in sorted(keys)[:_SHOWN])
    return shown + (f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


# -- the example call -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Call:
    """The example call of the model: its arguments, method and rngs, as for ``apply``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    method: str | Callable[..., Any] | None
    rngs: Any

    @property
    def method_name(self) -> str:
        method = self.method
        return "__call__" if method is None else getattr(method, "__name__", str(method))

    def concrete(self) -> _Call:
        """The call with each ``jax.ShapeDtypeStruct`` replaced by zeros of its shape.

        What the lifecycle reads (the weights a wrapper computes) does not depend on the
        input values, only on their shapes, so zeros do.
        """

        def zeros(leaf: Any) -> Any:
            if isinstance(leaf, jax.ShapeDtypeStruct):
                return jnp.zeros(leaf.shape, leaf.dtype)
            return leaf

        args, kwargs = jax.tree_util.tree_map(zeros, (self.args, self.kwargs))
        return dataclasses.replace(self, args=args, kwargs=kwargs)

    def apply(self, model: nn.Module, variables: Any, mutable: Any = False) -> Any:
        rngs = self.rngs
        if rngs is not None and not isinstance(rngs, Mapping):
            rngs = {"params": rngs}
        return model.apply(
            variables, *self.args, method=self.method, rngs=rngs, mutable=mutable, **self.kwargs
        )

    def init(self, model: nn.Module, rngs: Any) -> Any:
        return model.init(rngs, *self.args, method=self.method, **self.kwargs)

    def run(self, fn: Callable[[Any, _Call], Any], traced: Any, *, abstract: bool = False) -> Any:
        """``fn(traced, call)`` under ``jax.jit`` (``jax.eval_shape`` if ``abstract``).

        ``traced`` and the call's arrays are traced; its other arguments stay static, so
        a Python flag passed positionally still steers the model.
        """
        leaves, treedef = jax.tree_util.tree_flatten((self.args, self.kwargs, self.rngs))
        is_array = [isinstance(leaf, _ARRAYS) for leaf in leaves]

        def run(traced: Any, arrays: list[Any]) -> Any:
            given = iter(arrays)
            merged = [
                next(given) if array else leaf for leaf, array in zip(leaves, is_array, strict=True)
            ]
            args, kwargs, rngs = jax.tree_util.tree_unflatten(treedef, merged)
            return fn(traced, dataclasses.replace(self, args=args, kwargs=kwargs, rngs=rngs))

        arrays = [leaf for leaf, array in zip(leaves, is_array, strict=True) if array]
        if abstract:
            return jax.eval_shape(run, traced, arrays)
        try:
            return jax.jit(run)(traced, arrays)
        except jax.errors.UnexpectedTracerError as error:
            raise ValueError(
                "a wrapper in this model runs inside a lifted transform (nn.scan, nn.vmap, "
                "nn.remat, nn.jit, ...): the weights it computes there cannot be read from "
                "outside it. Use the model without the lifted transform (for nn.remat and "
                "nn.jit the variables are the same)."
            ) from error


# -- recording the transforms of a call ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Step:
    """One wrapper's transform of one variable."""

    wrapper: Wrapper  # the bound wrapper of the recorded call: its settings, never its scope
    path: _Path  # the wrapper's path
    inner_path: _Path  # the path of the module it wraps
    leaf_path: str  # Leaf.path, as its transform received it


@dataclasses.dataclass(frozen=True)
class _Transformed:
    """A variable that wrappers transformed in the recorded call."""

    key: _Key  # where the raw variable is: (collection, *path)
    steps: tuple[_Step, ...]  # innermost first


class _Recorder:
    """Collects what ``_View`` reports, while a call is traced."""

    def __init__(self) -> None:
        self.found: list[_Transformed] = []
        # The value received; when a variable is seen twice (a wrapper around a block that
        # holds a wrapper), the last view is the innermost, and its value the final one.
        self.values: dict[_Key, Any] = {}

    def __call__(self, seen: _Seen) -> None:
        steps = tuple(
            _Step(wrapper, tuple(wrapper.path), tuple(wrapper.layer_instance.path), leaf.path)
            for wrapper, leaf in seen.chain
        )
        key = (seen.collection, *seen.path)
        self.found.append(_Transformed(key, steps))
        self.values[key] = seen.value

    def transformed(self) -> dict[_Key, _Transformed]:
        """Each transformed variable once, with every transform applied to it, in order.

        A variable can be seen by several views: by each delegated call that reads it (a
        tied embedding's ``__call__`` and ``attend``: the same steps again), and by a view
        inside another one (a wrapper inside a wrapped block: the outer view's steps
        first, then the inner's). Each wrapper's step is kept once, in that order.
        """
        steps: dict[_Key, dict[_Path, _Step]] = {}
        for entry in self.found:
            by_wrapper = steps.setdefault(entry.key, {})
            for step in entry.steps:
                by_wrapper.setdefault(step.path, step)
        return {key: _Transformed(key, tuple(found.values())) for key, found in steps.items()}


@contextlib.contextmanager
def _recording() -> Iterator[_Recorder]:
    recorder = _Recorder()
    token = _RECORD.set(recorder)
    try:
        yield recorder
    finally:
        _RECORD.reset(token)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where the variables of a wrapped model are in the same model built without wrappers.

    A wrapper's own variables have no place there. A wrapper built in ``setup`` or at the
    top owns the module it wraps (``fc/layer_instance``); without the wrapper, that module
    is where the wrapper was (``fc``). A wrapper built in a parent's ``@nn.compact`` wraps
    a sibling (``Dense_0`` beside ``WeightNorm_0``), which stays where it is.
    """

    wrappers: tuple[_Step, ...]  # one step per wrapper, deepest first

    @classmethod
    def of(cls, transformed: list[_Transformed]) -> _Layout:
        wrappers = {step.path: step for entry in transformed for step in entry.steps}
        # Deepest first: removing a wrapper changes only paths below it, so each wrapper's
        # own paths are still valid when its turn comes.
        return cls(tuple(sorted(wrappers.values(), key=lambda step: -len(step.path))))

    def plain_path(self, path: _Path) -> _Path | None:
        """``path`` in the model without wrappers; ``None`` for a wrapper's own variable."""
        for wrapper in self.wrappers:
            if path[: len(wrapper.path)] != wrapper.path:
                continue
            inner = wrapper.inner_path
            if inner[:-1] == wrapper.path and path[: len(inner)] == inner:
                path = (*wrapper.path, *path[len(inner) :])
            else:
                return None
        return path


def _record_call(model: nn.Module, variables: Any, call: _Call) -> tuple[_Recorder, dict]:
    """Runs the call under ``jax.jit``; returns the record and the values received.

    The values come out as variables the view stores in each wrapper's scope while
    ``_EXPORT`` is set (``"__fold__/<collection>/<path>"``), in an apply with every
    collection mutable: inside ``nn.scan``, ``nn.vmap``, ``nn.remat`` or ``nn.jit`` that is
    how a value leaves the lifted trace, stacked along the transform's variable axis.
    """
    token = _EXPORT.set(True)
    try:
        with _recording() as recorder:
            values = call.run(lambda traced, c: _apply_recorded(model, traced, c), variables)
    finally:
        _EXPORT.reset(token)
    return recorder, values


def _apply_recorded(model: nn.Module, variables: Any, call: _Call) -> dict:
    _, updates = call.apply(model, variables, mutable=True)
    # Keys ("params", *outermost wrapper's path, "__fold__/<collection>/<variable path>").
    return {
        tuple(key[-1].split("/")[1:]): _unbox(value)
        for key, value in _flatten(updates).items()
        if key[-1].startswith(f"{EXPORTED}/")
    }


# -- checks -------------------------------------------------------------------------------


def _check_concrete(tree: Any, subject: str, what: str = "the variables") -> None:
    abstract = [
        leaf for leaf in jax.tree_util.tree_leaves(tree) if isinstance(leaf, jax.ShapeDtypeStruct)
    ]
    if abstract:
        raise TypeError(
            f"{subject}: {what} must be arrays, got {len(abstract)} jax.ShapeDtypeStruct "
            "leaves: the result is computed from their values."
        )


def _tree_problems(
    given: Mapping[_Key, Any], expected: Mapping[_Key, Any], *, check_shapes: bool
) -> list[str]:
    """Missing, extra and (optionally) misshapen paths of ``given``, one sentence each."""
    problems = []
    if missing := [key for key in expected if key not in given]:
        problems.append(f"missing {_listed(missing, expected)}")
    if extra := [key for key in given if key not in expected]:
        problems.append(f"not in the model: {_listed(extra, given)}")
    if check_shapes:
        misshapen = [
            f"{_name(key)} is {tuple(jnp.shape(_unbox(given[key])))}, expected "
            f"{tuple(jnp.shape(_unbox(expected[key])))}"
            for key in expected
            if key in given and jnp.shape(_unbox(given[key])) != jnp.shape(_unbox(expected[key]))
        ]
        if misshapen:
            problems.append("wrong shapes: " + "; ".join(misshapen[:_SHOWN]))
    return problems


def _model_variables(model: nn.Module, call: _Call) -> dict[_Key, Any]:
    """The variables the call's ``init`` creates, abstractly (nothing is computed)."""
    rngs = call.rngs
    keys = dict(rngs) if isinstance(rngs, Mapping) else {}
    keys.setdefault("params", jax.random.key(0))
    return _flatten(call.run(lambda traced, c: c.init(model, traced), keys, abstract=True))


# -- fold ---------------------------------------------------------------------------------


def fold(
    model: nn.Module,
    variables: Mapping[str, Any],
    *args: Any,
    method: str | Callable[..., Any] | None = None,
    rngs: Any = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Bakes every wrapper's transform into plain weights, for the model without wrappers.

    Runs ``model.apply(variables, *args, method=method, rngs=rngs, **kwargs)`` once (under
    ``jax.jit``) and records the value each wrapped module receives for each variable a
    wrapper transforms (``scale * v / ||v||``, ``W / sigma``, ...): that is the folded
    weight, cast to the raw variable's dtype and kept in its box. The wrappers' own
    variables are dropped, and an inner module that a wrapper built in ``setup`` or at the
    top holds (``fc/layer_instance``) moves to the wrapper's place (``fc``), where the same
    model built without wrappers keeps it. Every other variable, in every collection
    (``batch_stats`` of a wrapped block's ``BatchNorm``), is kept as it is.

    Pass the arguments of the forward pass whose outputs the folded model should
    reproduce: ``update_stats=False`` for a [`SpectralNorm`][wrapkit.linen.SpectralNorm]
    (its stored ``u``, the power iteration the forward pass runs), ``train=False``, ...
    Only what this call reaches is folded: for a model whose methods use different
    wrappers, choose a ``method`` that calls them all. The inputs may be
    ``jax.ShapeDtypeStruct``: only their shapes matter. A weight used by several
    delegated methods (a tied embedding) stays one variable.

    Args:
        model: the wrapped model.
        variables: its variables (arrays, not ``jax.ShapeDtypeStruct``).
        *args: example inputs of the call, arrays or ``jax.ShapeDtypeStruct``.
        method: the method to call, as for ``apply`` (default ``__call__``).
        rngs: random keys for the call, as for ``apply``.
        **kwargs: keyword arguments of the call.

    Returns:
        The variables of the model built without wrappers (a dict of collections).

    Raises:
        ValueError: when the variables do not fit the model (naming the missing and extra
            paths), or when some wrapper variables are left over (their wrapper did not run
            in the call).

    Examples:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from wrapkit.linen import WeightNorm, fold
        >>> wrapped, plain = WeightNorm(nn.Dense(3)), nn.Dense(3)
        >>> x = jnp.ones((2, 4))
        >>> variables = wrapped.init(jax.random.key(0), x)
        >>> folded = fold(wrapped, variables, x)
        >>> jax.tree_util.tree_map(jnp.shape, folded)
        {'params': {'bias': (3,), 'kernel': (4, 3)}}
        >>> bool(jnp.allclose(plain.apply(folded, x), wrapped.apply(variables, x), atol=1e-6))
        True
    """
    subject = f"fold({type(model).__name__})"
    call = _Call(args, kwargs, method, rngs)
    _check_concrete(variables, subject)
    flat = _flatten(variables)
    problems = _tree_problems(flat, _model_variables(model, call), check_shapes=False)
    if problems:
        raise ValueError(
            f"{subject}: the variables do not fit the model: {'; '.join(problems)}. Pass the "
            f"variables of this model (its init, or a checkpoint of it); fold takes the "
            f"variables that its example call ({call.method_name}) creates."
        )
    recorder, values = _record_call(model, variables, call.concrete())
    layout = _Layout.of(recorder.found)
    folded = {}
    for key, leaf in flat.items():
        path = layout.plain_path(key[1:])
        if path is None:
            continue
        folded[(key[0], *path)] = _like(leaf, values[key]) if key in values else leaf
    if left := [key for key in folded if any("/" in part for part in key[1:])]:
        raise ValueError(
            f"{subject}: {_listed(left)} look like a wrapper's own variables, but no "
            f"wrapkit wrapper that the call ({call.method_name}) ran owns them, so they "
            "were not folded. Call a method that runs every wrapper (method=...); flax's "
            "own nn.WeightNorm and nn.SpectralNorm cannot be folded (use wrapkit's)."
        )
    return _unflatten(folded)


# -- wrap a pretrained model --------------------------------------------------------------


def wrap_pretrained(
    model: nn.Module,
    variables: Mapping[str, Any],
    *args: Any,
    rngs: Any,
    method: str | Callable[..., Any] | None = None,
    exact: bool = True,
    **kwargs: Any,
) -> dict[str, Any]:
    """The wrapped model's variables that reproduce a plain model's trained ones.

    ``variables`` are those of the same model built without wrappers (a trained
    checkpoint). The wrapped model is initialised with ``rngs`` (its wrappers' own
    variables get their initial values, a LoRA factor its random init); then every
    variable of the plain model is copied to its place in the wrapped model, and each one
    a wrapper transforms is passed through the wrappers' [`invert`][wrapkit.linen.Wrapper.invert]
    hooks, outermost first, which give the raw value to store and the wrappers' own
    variables:

    - [`WeightNorm`][wrapkit.linen.WeightNorm]: the raw weight ``v`` is the pretrained
      one, the scale is its norm over the reduction axes (Salimans & Kingma's
      reparametrisation), so ``scale * v / ||v||`` is the pretrained weight;
    - [`SpectralNorm`][wrapkit.linen.SpectralNorm]: the raw weight is the pretrained one,
      ``u`` and ``sigma`` the top singular pair, the fixed point of its power iteration,
      so the first forward pass already uses the converged ``sigma``. ``W / sigma(W)`` is
      ``W`` only where ``sigma(W) = 1``.

    With ``exact=True`` the result is checked by folding it (the forward pass's own
    transforms): every weight the wrapped model sees must equal the pretrained one, to
    ``1e-5`` of its largest magnitude (two roundings of its dtype below float32).
    Otherwise it raises, naming each weight, the wrapper, how far off it is and why (a
    SpectralNorm of a weight whose largest singular value is not 1). ``exact=False``
    accepts what the wrappers make of the pretrained weights: SpectralNorm then trains
    from ``W / sigma(W)``, the weights rescaled, which is what most fine-tuning with a
    newly added spectral norm wants; the outputs change.

    Args:
        model: the wrapped model.
        variables: the variables of the model built without wrappers.
        *args: example inputs of the call, arrays or ``jax.ShapeDtypeStruct``.
        rngs: random keys for the wrapped model's ``init``, as for ``init``.
        method: the method to call, as for ``init`` (default ``__call__``).
        exact: check that the wrapped model sees every pretrained weight unchanged.
        **kwargs: keyword arguments of the call (``update_stats=False``, ...).

    Returns:
        The wrapped model's variables.

    Raises:
        TypeError: for a wrapper without an ``invert`` hook (its transform cannot be
            inverted), listing each.
        ValueError: when the pretrained variables do not fit the model without its
            wrappers (naming missing, extra and misshapen paths), and with ``exact=True``
            when the result does not reproduce them, or cannot be checked under
            ``jax.jit``.

    Examples:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from wrapkit.linen import WeightNorm, wrap_pretrained
        >>> plain, wrapped = nn.Dense(3), WeightNorm(nn.Dense(3))
        >>> x = jnp.ones((2, 4))
        >>> trained = plain.init(jax.random.key(1), x)
        >>> variables = wrap_pretrained(wrapped, trained, x, rngs=jax.random.key(0))
        >>> jax.tree_util.tree_map(jnp.shape, variables)
        {'params': {'layer_instance': {'bias': (3,), 'kernel': (4, 3)},
                    'layer_instance/kernel/scale': (3,)}}
        >>> bool(jnp.allclose(wrapped.apply(variables, x), plain.apply(trained, x), atol=1e-6))
        True
    """
    subject = f"wrap_pretrained({type(model).__name__})"
    call = _Call(args, kwargs, method, rngs)
    _check_concrete(variables, subject)
    plain = _flatten(variables)
    if exact and any(isinstance(leaf, jax.core.Tracer) for leaf in plain.values()):
        raise ValueError(
            f"{subject}: exact=True checks the result against the pretrained values, which "
            "needs them as arrays, not traced under jax.jit. Call wrap_pretrained outside "
            "jax.jit, or pass exact=False."
        )
    with _recording() as recorder:
        init_call = dataclasses.replace(call.concrete(), rngs=None)
        initial = _flatten(init_call.run(lambda keys, c: c.init(model, keys), rngs))
    transformed = recorder.transformed()
    not_invertible = {
        step.path: f"{_describe(step.wrapper)} {_where(step.path)}: "
        f"{type(step.wrapper).__name__} defines no invert(leaf), so its transform cannot "
        "be inverted. Leave the weights it transforms out of its variable_filter, or give "
        "the class an invert hook (see the lifecycle page of the docs)."
        for entry in transformed.values()
        for step in entry.steps
        if type(step.wrapper).invert is Wrapper.invert
    }
    if not_invertible:
        raise_collected(subject, list(not_invertible.values()), TypeError, ": ")

    layout = _Layout.of(recorder.found)
    places = {
        key: (key[0], *path) for key in initial if (path := layout.plain_path(key[1:])) is not None
    }
    problems = _tree_problems(
        plain, {place: initial[key] for key, place in places.items()}, check_shapes=True
    )
    if problems:
        raise ValueError(
            f"{subject}: the pretrained variables do not fit {type(model).__name__} "
            f"without its wrappers: {'; '.join(problems)}. Pass the variables of the same "
            "model built without the wrappers; there, a wrapper built in setup or at the "
            "top is the module it wraps (fc/layer_instance/kernel is fc/kernel)."
        )

    result = {key: _like(initial[key], _unbox(plain[place])) for key, place in places.items()}
    result = {**initial, **result}
    caveats: dict[_Key, list[str]] = {}
    problems = []
    for key, entry in transformed.items():
        box = initial[key] if isinstance(initial[key], AxisMetadata) else None
        value = _unbox(plain[places[key]])
        # Inside nn.scan or nn.vmap the wrappers saw one slice of the stacked variable.
        axis = _stacked_axis(subject, key, jnp.shape(value), jnp.shape(recorder.values[key]))
        for step in reversed(entry.steps):
            leaf = Leaf(step.leaf_path, key[0], value, box if axis is None else None)
            inverse = _invert(step.wrapper, leaf, axis, initial, step.path)
            for collection, named in inverse.variables.items():
                for name, own in named.items():
                    own_key = (collection, *step.path, name)
                    if own_key in initial:
                        # A scalar fills the variable (LoRA's zero B, whatever its shape).
                        shape = jnp.shape(_unbox(initial[own_key]))
                        result[own_key] = _like(initial[own_key], jnp.broadcast_to(own, shape))
                        continue
                    has = [k for k in initial if k not in places and _is_own(k, step.path)]
                    problems.append(
                        f"{_describe(step.wrapper)}.invert returned the variable "
                        f"{collection}/{name}, which it does not have (it has "
                        f"{_listed(has) if has else 'none'}). Return the variables "
                        "that its transform creates, named as it names them."
                    )
            if inverse.caveat:
                caveats.setdefault(key, []).append(inverse.caveat)
            value = inverse.value
        result[key] = _like(initial[key], value)
    if problems:
        raise_collected(subject, problems, ValueError, ": ")
    wrapped = _unflatten(result)
    if exact:
        _check_reproduces(subject, model, wrapped, call, plain, places, transformed, caveats)
    return wrapped


def _stacked_axis(subject: str, key: _Key, full: Any, seen: Any) -> int | None:
    """The axis along which a lifted transform stacked the variable, ``None`` if it did not.

    ``seen`` is the shape of the slice the wrapper received; ``full`` the variable's.
    """
    full, seen = tuple(full), tuple(seen)
    if full == seen:
        return None
    axes = [k for k in range(len(full)) if full[:k] + full[k + 1 :] == seen]
    if len(full) != len(seen) + 1 or not axes:
        raise ValueError(
            f"{subject}: {_name(key)} has shape {full}, but its wrappers saw {seen}: a lifted "
            "transform that does more than stack it along one axis is not supported."
        )
    return axes[0]


def _invert(
    wrapper: Wrapper, leaf: Leaf, axis: int | None, initial: Mapping[_Key, Any], path: _Path
) -> Inverse:
    """``wrapper.invert(leaf)``; slice by slice along ``axis`` for a stacked variable, whose
    wrapper variables are stacked along the same axis (as nn.scan's variable_axes do)."""
    if axis is None:
        return wrapper.invert(leaf)
    caveats: list[str | None] = []

    def one(value: Any) -> tuple[Any, Any]:
        inverse = wrapper.invert(dataclasses.replace(leaf, value=value))
        caveats.append(inverse.caveat)
        own = {
            collection: {
                # Each own variable as one slice (a scalar fills it: LoRA's zero B).
                name: jnp.broadcast_to(
                    value, _sliced(jnp.shape(_unbox(initial[(collection, *path, name)])), axis)
                )
                if (collection, *path, name) in initial
                else value
                for name, value in named.items()
            }
            for collection, named in inverse.variables.items()
        }
        return inverse.value, own

    value, variables = jax.vmap(one, in_axes=axis, out_axes=axis)(leaf.value)
    return Inverse(value, variables, caveats[0] if caveats else None)


def _sliced(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return shape[:axis] + shape[axis + 1 :]


def _is_own(key: _Key, wrapper: _Path) -> bool:
    """``key`` is a variable in the wrapper's own scope (not in a module below it)."""
    return len(key) == len(wrapper) + 2 and key[1:-1] == wrapper


def _check_reproduces(
    subject: str,
    model: nn.Module,
    wrapped: dict[str, Any],
    call: _Call,
    plain: Mapping[_Key, Any],
    places: Mapping[_Key, _Key],
    transformed: Mapping[_Key, _Transformed],
    caveats: Mapping[_Key, list[str]],
) -> None:
    seen = _flatten(
        fold(model, wrapped, *call.args, method=call.method, rngs=call.rngs, **call.kwargs)
    )
    problems = []
    for key, entry in transformed.items():
        place = places[key]
        wrappers = ", ".join(_describe(step.wrapper) for step in reversed(entry.steps))
        problem = _wrapping.pretrained_mismatch(
            _name(place), wrappers, _unbox(seen[place]), _unbox(plain[place]), caveats.get(key, [])
        )
        if problem is not None:
            problems.append(problem)
    _wrapping.raise_not_reproduced(subject, problems)


# -- data-dependent initialisation --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _NormCall:
    """A WeightNorm call in the data-dependent init, in call order."""

    wrapper: WeightNorm
    path: _Path
    kernel: _Key  # the variable it normalises
    leaf_path: str
    features: int


def init_from_data(
    model: nn.Module,
    variables: Mapping[str, Any],
    *args: Any,
    method: str | Callable[..., Any] | None = None,
    rngs: Any = None,
    epsilon: float = 1e-5,
    **kwargs: Any,
) -> dict[str, Any]:
    """Data-dependent initialisation of every WeightNorm (Salimans & Kingma 2016, 3.1).

    From one batch, sets each [`WeightNorm`][wrapkit.linen.WeightNorm]'s scale ``g`` and
    the wrapped layer's bias ``b`` so that the layer's outputs (the pre-activations) have
    zero mean and unit variance per feature on that batch: with ``t`` the layer's output
    under the given variables, mean ``mu`` and variance ``var`` over every axis but the
    last, ``g <- g / sqrt(var + epsilon)`` and ``b <- (b - mu) / sqrt(var + epsilon)``.
    Layers are initialised in forward order, each seeing the outputs of the data-initialised
    layers before it; it takes one forward pass (under ``jax.jit``), which hands each
    layer downstream the normalised output that its initialised upstream layer computes.
    The raw weights ``v`` are left as they are (initialise them as usual, e.g. with
    ``init``).

    Each WeightNorm must wrap one layer with one normalised kernel and a bias, whose
    outputs have the features last and one scale and one bias per feature (``Dense``,
    ``Conv`` with the default ``feature_axes=-1``), must have ``use_scale=True`` and be
    the outermost transform of the kernel (``WeightNorm(SpectralNorm(dense))`` works), and
    must run once in the call.

    Args:
        model: the model with WeightNorm wrappers.
        variables: its variables, e.g. from ``init``.
        *args: the batch, as for ``apply``.
        method: the method to call, as for ``apply`` (default ``__call__``).
        rngs: random keys for the call, as for ``apply``.
        epsilon: added to each variance before the square root, so that a feature that
            is constant on the batch gets a large finite scale rather than an infinite one.
        **kwargs: keyword arguments of the call.

    Returns:
        The variables, with the scales and biases of every WeightNorm'd layer replaced.

    Raises:
        ValueError: when there is no WeightNorm in the call, or listing every WeightNorm
            that cannot be initialised so (no bias, ``use_scale=False``, several kernels,
            not the outermost transform, called twice, features not last), each with what
            is expected.

    Examples:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from wrapkit.linen import WeightNorm, init_from_data
        >>> model = WeightNorm(nn.Dense(3))
        >>> batch = jax.random.normal(jax.random.key(1), (256, 4))
        >>> variables = init_from_data(model, model.init(jax.random.key(0), batch), batch)
        >>> y = model.apply(variables, batch)
        >>> jnp.round(y.mean(axis=0), 4) + 0.0, jnp.round(y.std(axis=0), 4)
        (Array([0., 0., 0.], dtype=float32), Array([1., 1., 1.], dtype=float32))
    """
    subject = f"init_from_data({type(model).__name__})"
    call = _Call(args, kwargs, method, rngs)
    _check_concrete(variables, subject)
    _check_concrete((args, kwargs), subject, "the batch")
    flat = _flatten(variables)
    norms: list[_NormCall] = []
    problems: list[str] = []

    def run(traced: Any, call: _Call, recorder: _Recorder) -> dict[int, Any]:
        scopes: dict[_Path, int] = {}  # the scope each WeightNorm ran in

        def interceptor(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
            module = context.module
            if not (
                isinstance(module, WeightNorm) and context.method_name in module.delegated_methods
            ):
                return next_fun(*args, **kwargs)
            path = tuple(module.path)
            if scopes.setdefault(path, id(module.scope)) != id(module.scope):
                # The same layer in a new scope: flax tracing a lifted body again (nn.scan
                # does), not a second call. The last trace's values are the ones kept.
                norms[:] = [norm for norm in norms if norm.path != path]
                scopes[path] = id(module.scope)
            start = len(recorder.found)
            out = next_fun(*args, **kwargs)
            found = _norm_call(module, recorder.found[start:], out, norms, problems)
            if found is None:
                return out
            norms.append(found)
            wide = jnp.asarray(out, jnp.promote_types(out.dtype, jnp.float32))
            axes = tuple(range(wide.ndim - 1))
            mean = wide.mean(axis=axes)
            std = jnp.sqrt(wide.var(axis=axes) + epsilon)
            # Stored as the wrapper's variables, so that they leave lifted transforms
            # (nn.scan stacks them per layer) the way flax moves any variable.
            module.put_variable("params", f"{EXPORTED}/mean", mean)
            module.put_variable("params", f"{EXPORTED}/std", std)
            # What the data-initialised layer computes, for the layers downstream.
            return ((wide - mean) / std).astype(out.dtype)

        with nn.intercept_methods(interceptor):
            _, updates = call.apply(model, traced, mutable=True)
        flat_updates = _flatten(updates)
        return {
            index: tuple(
                _unbox(flat_updates[("params", *norm.path, f"{EXPORTED}/{name}")])
                for name in ("mean", "std")
            )
            for index, norm in enumerate(norms)
        }

    with _recording() as recorder:
        statistics = call.run(lambda traced, c: run(traced, c, recorder), variables)
    if not norms and not problems:
        raise ValueError(
            f"{subject}: the call ({call.method_name}) ran no wrapkit WeightNorm, so there is "
            "nothing to initialise. Wrap the layers with wrapkit.linen.WeightNorm."
        )
    # A weight-normalised bias becomes sign(b) * scale: the init could not set it.
    normalised_biases = {
        entry.key
        for entry in recorder.found
        if any(isinstance(step.wrapper, WeightNorm) for step in entry.steps)
    }
    updates: dict[_Key, Any] = {}
    for index, norm in enumerate(norms):
        where = f"{_describe(norm.wrapper)} {_where(norm.path)}"
        # flax's WeightNorm names the scale of a boxed kernel ".../value/scale".
        scale_key = next(
            (
                key
                for name in ("scale", "value/scale")
                if (key := ("params", *norm.path, f"{norm.leaf_path}/{name}")) in flat
            ),
            None,
        )
        bias_key = (*norm.kernel[:-1], "bias")
        layer = "/".join(norm.kernel[1:-1]) or "the wrapped layer"
        if bias_key not in flat:
            problems.append(
                f"{where}: {layer} has no bias (expected {_name(bias_key)} of shape "
                f"({norm.features},)); the data-dependent init sets it to -mean / std. Build "
                "the layer with use_bias=True."
            )
            continue
        if scale_key is None:
            problems.append(
                f"{where}: its scale "
                f"{_name(('params', *norm.path, f'{norm.leaf_path}/scale'))} is not in the "
                "variables. Pass the variables of this model (its init)."
            )
            continue
        if bias_key in normalised_biases:
            problems.append(
                f"{where}: {_name(bias_key)} is weight-normalised too; the data-dependent "
                "init sets the plain bias. Leave it out of the variable_filter (the default, "
                "{'kernel'}, does)."
            )
            continue
        scale, bias = _unbox(flat[scale_key]), _unbox(flat[bias_key])
        mean, std = statistics[index]
        # One scale and bias per feature; inside nn.scan or nn.vmap, stacked like the
        # statistics (one set per layer).
        expected = jnp.shape(mean)
        if (
            expected[-1:] != (norm.features,)
            or jnp.shape(scale) != expected
            or jnp.shape(bias) != expected
        ):
            problems.append(
                f"{where}: expected one scale and one bias per output feature (the last "
                f"axis of the output, {norm.features}), got a scale of shape "
                f"{tuple(jnp.shape(scale))} and a bias of shape {tuple(jnp.shape(bias))}. "
                "Use feature_axes=-1 on a layer whose kernel's last axis is its output "
                "features (Dense, Conv)."
            )
            continue
        updates[scale_key] = _like(flat[scale_key], scale / std)
        updates[bias_key] = _like(flat[bias_key], (bias - mean) / std)
    # A WeightNorm that runs twice reports its problems twice; say each once.
    raise_collected(subject, list(dict.fromkeys(problems)), ValueError, ": ")
    return _unflatten({**flat, **updates})


def _norm_call(
    module: WeightNorm,
    found: list[_Transformed],
    out: Any,
    norms: list[_NormCall],
    problems: list[str],
) -> _NormCall | None:
    """The WeightNorm call to initialise, or ``None`` with its problems appended."""
    path = tuple(module.path)
    where = f"{_describe(module)} {_where(path)}"
    mine = {entry.key: entry for entry in found if any(step.path == path for step in entry.steps)}
    before = len(problems)
    if not module.use_scale:
        problems.append(
            f"{where} has use_scale=False; the data-dependent init sets each scale. Build "
            "it with use_scale=True."
        )
    if any(norm.path == path for norm in norms):
        problems.append(
            f"{where} runs more than once in the call; the data-dependent init needs the "
            "outputs of one call per layer. Initialise it on a model that calls it once."
        )
    if len(mine) != 1:
        problems.append(
            f"{where} normalises {len(mine)} variables ({_listed(list(mine))}); the "
            "data-dependent init needs one kernel per WeightNorm. Wrap each layer in its "
            "own WeightNorm, not a block of layers."
        )
    elif (entry := next(iter(mine.values()))).steps[-1].path != path:
        outer = entry.steps[-1].wrapper
        problems.append(
            _wrapping.transformed_after_weight_norm(
                where, _describe(outer), type(outer).__name__, _name(entry.key)
            )
        )
    if (problem := _wrapping.init_output_problem(where, out)) is not None:
        problems.append(problem)
    if len(problems) > before:
        return None
    entry = next(iter(mine.values()))
    step = next(step for step in entry.steps if step.path == path)
    return _NormCall(module, path, entry.key, step.leaf_path, int(out.shape[-1]))
