"""The lifecycle of a wrapped NNX model: fold, wrap a pretrained model, data-dependent init.

An NNX model holds its wrappers and their variables as objects, so nothing needs a call to
be found: every wrapper stack (``WeightNorm(SpectralNorm(Linear))``, outermost wrapper at
some path of the model) is read from the model's graph, and what the wrapped module
sees of each variable is computed as a delegated call computes it, from the stack's
transforms, innermost first. A stack nested inside the module another stack wraps (a
WeightNorm inside a wrapped block) sees what the outer stack made of its variables, so
stacks are taken outer first (``_Stack.depth``), as the calls nest.

Each function works on a copy (``nnx.clone``) and returns it; the model given is left as it
is. Only ``init_from_data`` needs a call: one forward pass on the batch under ``jax.jit``,
of a copy merged from the model's state, with an observer (``_wrapper._OBSERVE``) that sees
each WeightNorm's output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import graphlib

from .. import _wrapping
from .._problems import raise_collected
from ._weight_norm import WeightNorm
from ._wrapper import (
    _OBSERVE,
    _REQUIRED,
    Inverse,
    Leaf,
    Wrapper,
    _Applied,
    _apply_stack,
    _base,
    _delta_source,
    _describe,
    _path,
    _stack,
    _variables,
    views_reported,
)

_Keys = tuple[Any, ...]


def _where(path: _Keys) -> str:
    return f"at {_path(path)!r}" if path else "at the top"


# -- the model's graph --------------------------------------------------------------------


@dataclasses.dataclass
class _Node:
    """A module of the model: where it is, and every reference to it."""

    module: nnx.Module
    path: _Keys  # the first path that reaches it
    references: list[tuple[_Keys, Any, Any]]  # (path, parent, key), one per reference


def _children(node: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(node, nnx.Module):
        # What nnx's own traversal (nnx.iter_graph, nnx.recursive_map) reads: attributes
        # of a module, the items of an nnx.List or nnx.Dict.
        impl = graphlib.get_node_impl(node)
        assert impl is not None
        yield from impl.node_dict(node).items()
    elif isinstance(node, dict):
        yield from node.items()
    elif isinstance(node, list | tuple):
        yield from enumerate(node)


def _modules(model: nnx.Module) -> dict[int, _Node]:
    """Every module of ``model`` (``model`` itself at ``()``), by id, in graph order.

    Unlike ``nnx.iter_graph``, which yields a shared module once, it keeps every reference
    to each module: a module held twice (a tied layer) is two references to one node.
    """
    nodes = {id(model): _Node(model, (), [])}

    def walk(node: Any, path: _Keys) -> None:
        for key, child in _children(node):
            if not isinstance(child, nnx.Module | dict | list | tuple):
                continue
            where = (*path, key)
            if isinstance(child, nnx.Module):
                found = nodes.get(id(child))
                if found is not None:
                    found.references.append((where, node, key))
                    continue
                nodes[id(child)] = _Node(child, where, [(where, node, key)])
            walk(child, where)

    walk(model, ())
    return nodes


@dataclasses.dataclass(frozen=True)
class _Stack:
    """A chain of wrappers around one module, found at ``path`` in the model."""

    path: _Keys  # the outermost wrapper's
    wrappers: tuple[Wrapper, ...]  # innermost first
    depth: int = 0  # how many stacks' wrapped modules it sits in

    @property
    def outer(self) -> Wrapper:
        return self.wrappers[-1]

    @property
    def base(self) -> nnx.Module:
        return _base(self.outer)

    @property
    def base_path(self) -> _Keys:
        return (*self.path, *("layer_instance",) * len(self.wrappers))

    def inside(self, other: _Stack) -> bool:
        """Whether this stack sits in the module ``other`` wraps."""
        base = other.base_path
        return len(self.path) > len(base) and self.path[: len(base)] == base


def _stacks(nodes: Mapping[int, _Node]) -> list[_Stack]:
    """The wrapper stacks of the model, outer stacks before the stacks nested in them."""
    held = {
        id(parent.layer_instance)
        for node in nodes.values()
        for _, parent, key in node.references
        if isinstance(parent, Wrapper) and key == "layer_instance"
    }
    tops = [
        _Stack(node.path, tuple(_stack(node.module)))
        for node in nodes.values()
        if isinstance(node.module, Wrapper) and id(node.module) not in held
    ]
    stacks = [
        dataclasses.replace(stack, depth=sum(stack.inside(other) for other in tops))
        for stack in tops
    ]
    return sorted(stacks, key=lambda stack: stack.depth)


@dataclasses.dataclass(frozen=True)
class _Target:
    """A variable of a stack's wrapped module that some of its wrappers transform."""

    keys: _Keys  # in the wrapped module
    variable: nnx.Variable[Any]
    steps: tuple[Wrapper, ...]  # the wrappers that select it, innermost first

    def leaf(self, value: Any) -> Leaf:
        return Leaf(_path(self.keys), self.keys, value, self.variable)


def _targets(stack: _Stack) -> list[_Target]:
    selects = [(wrapper, wrapper._select()) for wrapper in stack.wrappers]
    targets = []
    for keys, variable in _variables(stack.base):
        path = _path(keys)
        steps = tuple(w for w, select in selects if select(keys, path, variable))
        if steps:
            targets.append(_Target(keys, variable, steps))
    return targets


# -- the values the wrapped modules see -------------------------------------------------


def _options(
    subject: str, function: str, stacks: list[_Stack], given: Mapping[str, Any]
) -> dict[int, dict[str, Any]]:
    """Each wrapper's call options (by id), from those given and the defaults.

    The keyword-only parameters of a wrapper's ``transform`` (``update_stats``) are what
    its delegated calls take; a computation outside a call takes them here.
    """
    wrappers = {id(w): w for stack in stacks for w in stack.wrappers}
    taken = {name for w in wrappers.values() for name in w._call_options}
    names = sorted({type(w).__name__ for w in wrappers.values()})
    takes = "takes" if len(names) == 1 else "take"
    offered = (
        f"{' and '.join(names)} {takes} {', '.join(map(repr, sorted(taken))) or 'none'}"
        if names
        else "it holds none"
    )
    problems = [
        f"option {name!r} is a call option of no wrapper in the model: {offered}."
        for name in given
        if name not in taken
    ]
    missing = {
        (type(w).__name__, name): _describe(w)
        for w in wrappers.values()
        for name, default in w._call_options.items()
        if default is _REQUIRED and name not in given
    }
    problems += [
        f"{described} takes the call option {name!r} on every call, with no default. Pass "
        f"it: {function}(model, {name}=...)."
        for (_, name), described in missing.items()
    ]
    raise_collected(subject, problems, TypeError, ": ")
    return {
        key: {name: given.get(name, default) for name, default in w._call_options.items()}
        for key, w in wrappers.items()
    }


def _effective(target: _Target, options: Mapping[int, dict[str, Any]]) -> Any:
    """The value the wrapped module sees for ``target`` in a delegated call.

    A low-rank wrapper's delta is added merged, ``W + s * A @ B`` in at least float32, on
    the axes its ``delta_feature_axes`` gives (else the last axis is the output), as where
    a call has no use that fixes them.
    """
    selecting = [_Applied(w, options[id(w)], True, w._select()) for w in target.steps]
    value, factored = _apply_stack(
        selecting, target.keys, target.variable, target.variable.get_value()
    )
    if factored is not None:
        value = jnp.asarray(value)
        source = _delta_source(factored, target.leaf(value))
        source.default_partition(value.ndim)
        value = source.merged(value)
    return value


def _write(variable: nnx.Variable[Any], value: Any) -> None:
    """``value`` into ``variable``, in its dtype (cast once)."""
    variable.set_value(jnp.asarray(value, jnp.result_type(variable.get_value())))


def _bake(stacks: list[_Stack], options: Mapping[int, dict[str, Any]], subject: str) -> None:
    """Writes what each wrapped module sees into its variables, outer stacks first."""
    written: dict[int, _Stack] = {}
    for stack in stacks:
        values = []
        for target in _targets(stack):
            earlier = written.get(id(target.variable))
            if earlier is not None and not stack.inside(earlier):
                raise ValueError(
                    f"{subject}: {_describe(stack.outer)} {_where(stack.path)} and "
                    f"{_describe(earlier.outer)} {_where(earlier.path)} both transform "
                    f"{_path(target.keys)} of the module they wrap, so it has no one folded "
                    "value. Wrap a module once (for a tied weight, one wrapper delegating "
                    "each method: delegates=('__call__', 'attend'))."
                )
            written[id(target.variable)] = stack
            values.append((target.variable, _effective(target, options)))
        for variable, value in values:
            _write(variable, value)


def _unwrapped(path: _Keys, node: Any) -> Any:
    return _base(node) if isinstance(node, Wrapper) else node


# -- checks -------------------------------------------------------------------------------


def _check_model(subject: str, model: Any) -> None:
    if isinstance(model, type) or not isinstance(model, nnx.Module):
        got = model.__qualname__ if isinstance(model, type) else type(model).__qualname__
        raise TypeError(
            f"{subject}: expected a flax.nnx.Module instance, got "
            f"{'the class ' if isinstance(model, type) else ''}{got}. For a Linen model, use "
            "the function of the same name in wrapkit.linen."
        )


def _check_concrete(subject: str, values: list[Any], what: str = "the variables") -> None:
    abstract = [v for v in values if isinstance(v, jax.ShapeDtypeStruct)]
    if abstract:
        raise TypeError(
            f"{subject}: {what} must be arrays, got {len(abstract)} jax.ShapeDtypeStruct "
            "leaves: the result is computed from their values."
        )


def _check_used_through_wrappers(
    subject: str, stacks: list[_Stack], nodes: Mapping[int, _Node]
) -> None:
    """Refuses a wrapped module that the model also uses directly: folded, the one module
    would have to hold both the weights the wrapper makes and the raw ones."""
    problems = []
    for stack in stacks:
        node = nodes[id(stack.base)]
        others = [
            path
            for path, parent, key in node.references
            if not (isinstance(parent, Wrapper) and key == "layer_instance")
        ]
        if others:
            problems.append(
                f"{type(stack.base).__name__} {_where(stack.base_path)}, which "
                f"{_describe(stack.outer)} wraps, is also used directly "
                f"{_where(others[0])}: one module cannot hold both the weights the wrapper "
                "makes and the raw ones. Use it only through the wrapper (a tied weight: "
                "one wrapper delegating each method, delegates=('__call__', 'attend'))."
            )
    raise_collected(subject, problems, ValueError, ": ")


def _flax_wrappers(nodes: Mapping[int, _Node]) -> list[str]:
    return [
        f"{_path(node.path) or 'the model'} is flax's nnx.{type(node.module).__name__}, which "
        "writes its normalised weight into the module it wraps and is no wrapkit wrapper; "
        f"use wrapkit.nnx.{type(node.module).__name__}."
        for node in nodes.values()
        if isinstance(node.module, nnx.WeightNorm | nnx.SpectralNorm)
    ]


# -- fold ---------------------------------------------------------------------------------


def fold(model: nnx.Module, **options: Any) -> nnx.Module:
    """Bakes every wrapper's transform into plain weights: the model without its wrappers.

    Returns a new model (``model`` is left as it is) in which each wrapkit.nnx wrapper,
    wherever it is (an attribute, an ``nnx.List`` or ``nnx.Sequential``, a dict), is
    replaced by the module it wraps, holding the weights the wrapper made it see: ``scale
    * v / ||v||`` for a [`WeightNorm`][wrapkit.nnx.WeightNorm], ``W + s * A @ B`` for a
    low-rank wrapper (computed in at least float32). Each weight is cast once to the raw
    variable's dtype and keeps its metadata. A stack (``WeightNorm(SpectralNorm(Linear))``)
    folds in one go; a wrapper inside a wrapped block folds as the calls nest, the outer
    wrapper's transform first. The wrappers' own variables are gone; every other variable
    (a wrapped block's ``BatchStat``s, RNG state) is copied.

    Args:
        model: the wrapped NNX model.
        **options: call options of the wrappers, as a forward pass takes them:
            ``update_stats=False`` for a SpectralNorm. A wrapper whose call option has a
            default takes the default.

    Returns:
        A new model, without wrappers, whose outputs are the wrapped model's.

    Raises:
        TypeError: for a model that is not an NNX module, abstract variables
            (``nnx.eval_shape``), an option no wrapper takes, or a call option without a
            default that is not given.
        ValueError: for flax's own ``nnx.WeightNorm`` or ``nnx.SpectralNorm`` in the model,
            a wrapped module that the model also uses directly, two wrappers around one
            module, or a transform after a low-rank delta.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from wrapkit.nnx import WeightNorm, fold
        >>> model = WeightNorm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
        >>> folded = fold(model)
        >>> type(folded).__name__
        'Linear'
        >>> x = jnp.ones((2, 4))
        >>> bool(jnp.allclose(folded(x), model(x), atol=1e-6))
        True
    """
    subject = f"fold({type(model).__name__})"
    _check_model(subject, model)
    folded = nnx.clone(model)
    nodes = _modules(folded)
    raise_collected(subject, _flax_wrappers(nodes), ValueError, ": ")
    stacks = _stacks(nodes)
    chosen = _options(subject, "fold", stacks, options)
    _check_used_through_wrappers(subject, stacks, nodes)
    _check_concrete(subject, [t.variable.get_value() for stack in stacks for t in _targets(stack)])
    _bake(stacks, chosen, subject)
    return nnx.recursive_map(_unwrapped, folded)  # type: ignore[no-any-return]


# -- wrap a pretrained model --------------------------------------------------------------


def wrap_pretrained(model: nnx.Module, *, exact: bool = True, **options: Any) -> nnx.Module:
    """The wrapped model whose outputs are those of the pretrained modules it wraps.

    Build the wrappers around the pretrained modules (``WeightNorm(pretrained)``, or
    [`inject`][wrapkit.nnx.inject] into a pretrained model); their raw variables then hold
    the pretrained weights. ``wrap_pretrained`` returns a copy (``model`` is left as it is)
    in which each weight a wrapper transforms is passed through the wrappers'
    [`invert`][wrapkit.nnx.Wrapper.invert] hooks, outermost first, which give the raw
    value to store and the wrappers' own variables:

    - [`WeightNorm`][wrapkit.nnx.WeightNorm]: ``v`` is the pretrained weight and the scale
      its norm (Salimans & Kingma's reparametrisation), so ``scale * v / ||v||`` is the
      pretrained weight;
    - a SpectralNorm: the weight is kept, ``u`` and ``sigma`` are the top singular pair;
      ``W / sigma(W)`` is ``W`` only where ``sigma(W) = 1``;
    - LoRA: a zero ``B``, so the delta is zero.

    With ``exact=True`` the result is checked by folding it: every weight the wrapped model
    sees must equal the pretrained one, to ``1e-5`` of its largest magnitude (two roundings
    of its dtype below float32). Otherwise it raises, naming each weight, its wrappers, how
    far off it is and why (a SpectralNorm of a weight whose largest singular value is not
    1). ``exact=False`` accepts what the wrappers make of the pretrained weights (the
    outputs then change). A wrapper without ``invert`` (WeightStandardization: many weights
    standardise to the same one) is refused.

    Args:
        model: an NNX model holding wrapkit.nnx wrappers built around pretrained modules.
        exact: check that the wrapped model sees every pretrained weight unchanged.
        **options: call options of the wrappers for the check (``update_stats=False``).

    Returns:
        A new model: the wrappers, with the raw and own variables ``invert`` gives.

    Raises:
        TypeError: for a wrapper without an ``invert`` hook (listing each), an option no
            wrapper takes, or a call option without a default that is not given.
        ValueError: for a model without wrappers, an ``invert`` returning a variable its
            wrapper lacks, and with ``exact=True`` when the result does not reproduce the
            pretrained weights, or they are traced (under ``jax.jit``).

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from wrapkit.nnx import WeightNorm, wrap_pretrained
        >>> pretrained = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        >>> model = wrap_pretrained(WeightNorm(pretrained))
        >>> x = jnp.ones((2, 4))
        >>> bool(jnp.allclose(model(x), pretrained(x), atol=1e-6))
        True
    """
    subject = f"wrap_pretrained({type(model).__name__})"
    _check_model(subject, model)
    wrapped = nnx.clone(model)
    nodes = _modules(wrapped)
    stacks = _stacks(nodes)
    if not stacks:
        raise ValueError(
            f"{subject}: the model holds no wrapkit.nnx wrapper, so there is nothing to "
            "invert. Build the wrappers around the pretrained modules first: "
            "WeightNorm(pretrained), or inject(pretrained, WeightNorm, pattern)."
        )
    not_invertible = {
        id(w): f"{_describe(w)} {_where(stack.path)}: {type(w).__name__} defines no "
        "invert(leaf), so its transform cannot be inverted. Leave the weights it transforms "
        "out of its variable_filter, or give the class an invert hook (see the lifecycle "
        "page of the docs)."
        for stack in stacks
        for w in stack.wrappers
        if type(w).invert is Wrapper.invert
    }
    raise_collected(subject, list(not_invertible.values()), TypeError, ": ")
    _options(subject, "wrap_pretrained", stacks, options)  # checked before any change
    _check_used_through_wrappers(subject, stacks, nodes)
    state_keys = {id(v): keys for keys, v in nnx.to_flat_state(nnx.state(wrapped))}
    pretrained: dict[_Keys, Any] = {}
    through: dict[_Keys, list[Wrapper]] = {}  # the wrappers each weight goes through
    caveats: dict[_Keys, list[str]] = {}
    problems: list[str] = []
    targets = [(stack, t) for stack in reversed(stacks) for t in _targets(stack)]
    values = [t.variable.get_value() for _, t in targets]
    _check_concrete(subject, values)
    if exact and any(isinstance(value, jax.core.Tracer) for value in values):
        raise ValueError(
            f"{subject}: exact=True checks the result against the pretrained values, which "
            "needs them as arrays, not traced under jax.jit. Call wrap_pretrained outside "
            "jax.jit, or pass exact=False."
        )
    # The stacks nested deepest saw their weights last, so they are inverted first.
    for _, target in targets:
        keys = state_keys[id(target.variable)]
        value = target.variable.get_value()
        pretrained.setdefault(keys, value)
        through[keys] = [*target.steps, *through.get(keys, [])]
        for wrapper in reversed(target.steps):
            leaf = target.leaf(value)
            inverse = wrapper.invert(leaf)
            problems += _set_own(wrapper, leaf, inverse)
            if inverse.caveat:
                caveats.setdefault(keys, []).append(inverse.caveat)
            value = inverse.value
        _write(target.variable, value)
    raise_collected(subject, problems, ValueError, ": ")
    if exact:
        _check_reproduces(subject, wrapped, pretrained, through, caveats, options)
    return wrapped


def _set_own(wrapper: Wrapper, leaf: Leaf, inverse: Inverse) -> list[str]:
    """Writes the own variables ``inverse`` names; the problems, one sentence each."""
    problems = []
    owned = {
        name: found[leaf.path]
        for name, found in vars(wrapper).items()
        if isinstance(found, nnx.Dict) and leaf.path in found
    }
    for name, value in inverse.variables.items():
        variable = owned.get(name)
        if variable is None:
            problems.append(
                f"{_describe(wrapper)}.invert returned the variable {name!r} for "
                f"{leaf.path!r}, which it does not have (it has "
                f"{', '.join(map(repr, owned)) or 'none'}). Return the variables that its "
                "create makes, named as it names them."
            )
            continue
        # A scalar fills the variable (LoRA's zero B, whatever its shape).
        _write(variable, jnp.broadcast_to(value, jnp.shape(variable.get_value())))
    return problems


def _check_reproduces(
    subject: str,
    wrapped: nnx.Module,
    pretrained: Mapping[_Keys, Any],
    through: Mapping[_Keys, list[Wrapper]],
    caveats: Mapping[_Keys, list[str]],
    options: Mapping[str, Any],
) -> None:
    check = nnx.clone(wrapped)
    stacks = _stacks(_modules(check))
    _bake(stacks, _options(subject, "wrap_pretrained", stacks, options), subject)
    seen = {keys: v.get_value() for keys, v in nnx.to_flat_state(nnx.state(check))}
    problems = []
    for keys, expected in pretrained.items():
        wrappers = ", ".join(_describe(w) for w in reversed(through[keys]))
        problem = _wrapping.pretrained_mismatch(
            _path(keys), wrappers, seen[keys], expected, caveats.get(keys, [])
        )
        if problem is not None:
            problems.append(problem)
    _wrapping.raise_not_reproduced(subject, problems)


# -- data-dependent initialisation --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _NormCall:
    """A WeightNorm call of the forward pass that can be initialised."""

    path: _Keys  # of the WeightNorm in the model
    leaf_path: str  # its kernel, in the module it wraps
    bias: _Keys  # the bias, in the module it wraps


def init_from_data(
    model: nnx.Module, *args: Any, epsilon: float = 1e-5, **kwargs: Any
) -> nnx.Module:
    """Data-dependent initialisation of every WeightNorm (Salimans & Kingma 2016, 3.1).

    From one batch, sets each [`WeightNorm`][wrapkit.nnx.WeightNorm]'s scale ``g`` and the
    wrapped layer's bias ``b`` so that the layer's outputs (the pre-activations) have zero
    mean and unit variance per feature on that batch: with ``t`` the layer's output, mean
    ``mu`` and variance ``var`` over every axis but the last, ``g <- g / sqrt(var +
    epsilon)`` and ``b <- (b - mu) / sqrt(var + epsilon)``. It takes one forward pass,
    ``model(*args, **kwargs)``, under ``jax.jit`` (the batch's arrays are traced, its other
    arguments stay Python values) on a copy of the model whose state updates, batch
    statistics and RNG counts, are dropped. In it each WeightNorm hands the layers
    downstream its normalised output, which is what the initialised layer computes: every
    layer is initialised on the outputs of the initialised layers before it. The raw
    weights ``v`` are left as they are. Returns a new model; ``model`` is left as it is.

    Each WeightNorm must wrap one layer with one normalised kernel and a bias, whose
    outputs have the features last and one scale and one bias per feature (``Linear``,
    ``Conv`` with the default ``feature_axes=-1``), must have ``use_scale=True`` and be the
    outermost transform of the kernel (``WeightNorm(SpectralNorm(linear))`` works), and
    must run once in the call.

    Args:
        model: the NNX model with WeightNorm wrappers.
        *args: the batch, as for ``model(...)``.
        epsilon: added to each variance before the square root, so that a feature that is
            constant on the batch gets a large finite scale rather than an infinite one.
        **kwargs: keyword arguments of the call.

    Returns:
        A new model, with the scales and biases of every WeightNorm'd layer set.

    Raises:
        ValueError: when the call runs no WeightNorm, or listing every WeightNorm that
            cannot be initialised so (no bias, ``use_scale=False``, several kernels, not
            the outermost transform, called twice, features not last), each with what is
            expected.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from wrapkit.nnx import WeightNorm, init_from_data
        >>> model = WeightNorm(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
        >>> batch = jax.random.normal(jax.random.key(1), (256, 4))
        >>> y = init_from_data(model, batch)(batch)
        >>> jnp.round(y.mean(axis=0), 4) + 0.0, jnp.round(y.std(axis=0), 4)
        (Array([0., 0., 0.], dtype=float32), Array([1., 1., 1.], dtype=float32))
    """
    subject = f"init_from_data({type(model).__name__})"
    _check_model(subject, model)
    _check_concrete(subject, jax.tree_util.tree_leaves((args, kwargs)), "the batch")
    norms: list[_NormCall] = []
    problems: list[str] = []
    graphdef, state = nnx.split(model)
    # The batch's arrays are traced; its other leaves (a flag) stay Python values.
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    is_array = [isinstance(leaf, jax.Array | np.ndarray) for leaf in leaves]

    def forward(state: Any, arrays: list[Any]) -> list[tuple[jax.Array, jax.Array]]:
        given = iter(arrays)
        merged = [
            next(given) if array else leaf for leaf, array in zip(leaves, is_array, strict=True)
        ]
        call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, merged)
        # A copy of the model: the state its call updates is dropped with the trace.
        probe = nnx.merge(graphdef, state)
        norms.clear()
        problems.clear()
        return _observed(probe, call_args, call_kwargs, epsilon, norms, problems)

    arrays = [leaf for leaf, array in zip(leaves, is_array, strict=True) if array]
    statistics = jax.jit(forward)(state, arrays)
    if not norms and not problems:
        raise ValueError(
            f"{subject}: the call ran no wrapkit WeightNorm, so there is nothing to "
            "initialise. Wrap the layers with wrapkit.nnx.WeightNorm."
        )
    raise_collected(subject, problems, ValueError, ": ")
    initialised = nnx.clone(model)
    nodes = {node.path: node.module for node in _modules(initialised).values()}
    for found, (mean, std) in zip(norms, statistics, strict=True):
        norm = nodes[found.path]
        assert isinstance(norm, WeightNorm)
        scale = norm.scale[found.leaf_path]
        bias = dict(_variables(_base(norm)))[found.bias]
        _write(scale, scale.get_value() / std)
        _write(bias, (bias.get_value() - mean) / std)
    return initialised


def _observed(
    probe: nnx.Module,
    args: Any,
    kwargs: Any,
    epsilon: float,
    norms: list[_NormCall],
    problems: list[str],
) -> list[tuple[jax.Array, jax.Array]]:
    """Calls ``probe``, handing the layers downstream each WeightNorm's output normalised;
    the statistics of each one that can be initialised, in ``norms``' order."""
    paths = {id(node.module): node.path for node in _modules(probe).values()}
    statistics: list[tuple[jax.Array, jax.Array]] = []
    seen: set[_Keys] = set()

    def listen(base: nnx.Module, view: nnx.Module) -> None:
        # A wrapper inside a wrapped block runs in the block's view: its modules are new
        # objects, standing for the block's at the same paths.
        prefix = paths.get(id(base))
        if prefix is None:  # a module the model does not hold (built in the call)
            return
        for path, node in nnx.iter_graph(view):
            if isinstance(node, nnx.Module):
                paths[id(node)] = (*prefix, *path)

    def observe(outer: Wrapper, method: str, out: Any) -> Any:
        stack = _stack(outer)
        if method not in outer.delegated_methods:
            return out
        for norm in [w for w in stack if isinstance(w, WeightNorm)]:
            path = paths.get(id(norm))
            if path is None:
                problems.append(
                    f"{_describe(norm)} runs in the call but is not held by the model (it is "
                    "built in the call), so its scale has nowhere to be set. Build it in "
                    "__init__, as an attribute of the model."
                )
                continue
            found = _norm_call(norm, stack, path, out, seen, problems)
            if found is None:
                continue
            wide = jnp.asarray(out, jnp.promote_types(out.dtype, jnp.float32))
            axes = tuple(range(wide.ndim - 1))
            mean = wide.mean(axis=axes)
            std = jnp.sqrt(wide.var(axis=axes) + epsilon)
            norms.append(found)
            statistics.append((mean, std))
            # What the data-initialised layer computes, for the layers downstream.
            out = ((wide - mean) / std).astype(out.dtype)
        return out

    token = _OBSERVE.set(observe)
    try:
        with views_reported(listen):
            probe(*args, **kwargs)
    finally:
        _OBSERVE.reset(token)
    return statistics


def _norm_call(
    norm: WeightNorm,
    stack: list[Wrapper],
    path: _Keys,
    out: Any,
    seen: set[_Keys],
    problems: list[str],
) -> _NormCall | None:
    """The WeightNorm call to initialise, or ``None`` with its problems appended."""
    where = f"{_describe(norm)} {_where(path)}"
    base = _base(norm)
    variables = dict(_variables(base))
    select = norm._select()
    mine = [keys for keys, v in variables.items() if select(keys, _path(keys), v)]
    before = len(problems)
    if not norm.use_scale:
        problems.append(
            f"{where} has use_scale=False; the data-dependent init sets each scale. Build "
            "it with use_scale=True."
        )
    if path in seen:
        problems.append(
            f"{where} runs more than once in the call; the data-dependent init needs the "
            "outputs of one call per layer. Initialise it on a model that calls it once."
        )
    seen.add(path)
    if len(mine) != 1:
        problems.append(
            f"{where} normalises {len(mine)} variables ({', '.join(map(_path, mine))}); the "
            "data-dependent init needs one kernel per WeightNorm. Wrap each layer in its "
            "own WeightNorm, not a block of layers."
        )
    else:
        kernel = mine[0]
        later = stack[stack.index(norm) + 1 :]
        outer = next(
            (w for w in later if w._select()(kernel, _path(kernel), variables[kernel])), None
        )
        if outer is not None:
            problems.append(
                _wrapping.transformed_after_weight_norm(
                    where, _describe(outer), type(outer).__name__, _path(kernel)
                )
            )
    if (problem := _wrapping.init_output_problem(where, out)) is not None:
        problems.append(problem)
    if len(problems) > before:
        return None
    kernel = mine[0]
    features = int(out.shape[-1])
    bias = (*kernel[:-1], "bias")
    layer = _path(kernel[:-1]) or type(base).__name__
    if bias not in variables:
        problems.append(
            f"{where}: {layer} has no bias (expected {_path((*path, *_below(norm), *bias))} "
            f"of shape ({features},)); the data-dependent init sets it to -mean / std. Build "
            "the layer with use_bias=True."
        )
        return None
    normalised = [w for w in stack if isinstance(w, WeightNorm)]
    if any(w._select()(bias, _path(bias), variables[bias]) for w in normalised):
        problems.append(
            f"{where}: {_path(bias)} is weight-normalised too; the data-dependent init sets "
            "the plain bias. Leave it out of the variable_filter (the default, 'kernel', "
            "does)."
        )
        return None
    leaf = Leaf(_path(kernel), kernel, variables[kernel].get_value(), variables[kernel])
    features_axes, _ = norm._axes(leaf)
    scale_shape = tuple(jnp.shape(norm.own("scale", leaf).get_value()))
    bias_shape = tuple(jnp.shape(variables[bias].get_value()))
    ndim = jnp.ndim(leaf.value)
    if features_axes != (ndim - 1,) or scale_shape != (features,) or bias_shape != (features,):
        problems.append(
            f"{where}: expected one scale and one bias per output feature (the last axis "
            f"of the output, {features}), got a scale of shape {scale_shape} and a bias of "
            f"shape {bias_shape}. Use feature_axes=-1 on a layer whose kernel's last axis "
            "is its output features (Linear, Conv)."
        )
        return None
    return _NormCall(path, _path(kernel), bias)


def _below(wrapper: Wrapper) -> _Keys:
    """The path from a wrapper to the module at the bottom of its stack."""
    return ("layer_instance",) * len(_stack(wrapper))
