"""Variables of an NNX wrapper stack as those of its Linen twin, and back.

The twins name things alike: a Linen wrapper keeps the module it wraps as its child
``layer_instance``, and its own variables in its own scope, named after that child and the
variable's path there: ``params/layer_instance/kernel`` and
``params/layer_instance/kernel/scale`` (one key with slashes) for ``WeightNorm(Dense)``. In
a stack each wrapper is its outer wrapper's ``layer_instance``, so ``WeightNorm(
SpectralNorm(Dense))`` keeps the kernel at ``params/layer_instance/layer_instance/kernel``,
SpectralNorm's ``u`` at ``batch_stats/layer_instance/layer_instance/kernel/u`` and
WeightNorm's scale at ``params/layer_instance/kernel/scale``. The NNX stack has the same
tree: the module at ``layer_instance`` once per wrapper, and each wrapper's own variables
at ``<name>/<variable path>`` below it (``scale/kernel``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx, traverse_util
from flax.core import meta, unfreeze
from flax.nnx import variablelib

from ..linen._lifecycle import _tree_problems
from ._lifecycle import _write
from ._wrapper import Wrapper, _describe, _owned_prefixes, _path, _stack

_Keys = tuple[Any, ...]


def _collection(variable: nnx.Variable[Any]) -> str | None:
    """The Linen collection of an NNX variable type (``Param`` and its subclasses, such as
    ``LoRAParam``, are ``params``; ``BatchStat`` is ``batch_stats``), or ``None`` for RNG
    state, which Linen keeps out of the variables."""
    if isinstance(variable, nnx.RngState):
        return None
    for kind in type(variable).__mro__:
        if isinstance(kind, type) and issubclass(kind, nnx.Variable):
            try:
                return variablelib.variable_name_from_type(kind)
            except ValueError:  # not registered: try its base class
                continue
    raise TypeError(
        f"{type(variable).__name__} has no Linen collection: register one with "
        "flax.nnx.register_variable_name(name, type)."
    )


def _linen_keys(wrapper: Wrapper, subject: str) -> Iterator[tuple[_Keys, nnx.Variable[Any]]]:
    """Each variable of the stack with its Linen key ``(collection, *path)``."""
    stack = _stack(wrapper)[::-1]  # outermost first: depth d is at ("layer_instance",) * d
    base = stack[-1].layer_instance
    if nested := _owned_prefixes(base):
        raise ValueError(
            f"{subject}: the Linen twin names the variables of a stack of wrappers around "
            f"one module, but {type(base).__name__} holds wrappers itself (at "
            f"{', '.join(repr(_path(p)) for p in nested)}). Convert each stack on its own."
        )
    for keys, variable in nnx.to_flat_state(nnx.state(wrapper)):
        collection = _collection(variable)
        if collection is None:
            continue
        depth = 0
        while depth < len(stack) and keys[depth : depth + 1] == ("layer_instance",):
            depth += 1
        if depth == len(stack):  # a variable of the wrapped module
            yield (collection, *map(str, keys)), variable
            continue
        owner, rest = stack[depth], keys[depth:]
        if len(rest) != 2 or not isinstance(vars(owner).get(str(rest[0])), nnx.Dict):
            raise ValueError(
                f"{subject}: {_path(keys)} belongs to {_describe(owner)} but is none of the "
                "variables its create makes (<name>/<variable path>), so its Linen twin has "
                "no name for it."
            )
        name, path = rest
        yield (collection, *("layer_instance",) * depth, f"layer_instance/{path}/{name}"), variable


def to_linen_variables(wrapper: Wrapper) -> dict[str, Any]:
    """The variables of the Linen twin of an NNX wrapper stack, e.g. for ``apply``.

    For ``WeightNorm(nnx.Linear(...))`` they are those of
    ``wrapkit.linen.WeightNorm(nn.Dense(...))``: ``params/layer_instance/{kernel,bias}``
    and ``params/layer_instance/kernel/scale``. A stack keeps each inner wrapper one
    ``layer_instance`` further down, as Linen does (see the module docstring). Variable
    types go to their Linen collections (``Param`` and ``LoRAParam`` to ``params``,
    ``BatchStat`` to ``batch_stats``); RNG state, which Linen keeps out of the variables,
    is left out. The values are the NNX arrays, without their sharding metadata.

    The wrapped module's variables keep their NNX names, which are Linen's for single
    layers (``nnx.Linear`` and ``nn.Dense``, ``nnx.Conv`` and ``nn.Conv``, ``nnx.Embed``
    and ``nn.Embed``, the normalisation layers); modules that name their submodules
    otherwise (``nnx.Sequential``'s ``layers/0`` is Linen's ``layers_0``) do not match.

    Args:
        wrapper: a wrapkit.nnx wrapper (or stack of them) around one module.

    Returns:
        ``{collection: nested dict}``, as ``init`` returns them.

    Raises:
        TypeError: for something other than a wrapkit.nnx wrapper, or a variable type
            without a Linen collection.
        ValueError: for a wrapped module that holds wrappers itself.

    Examples:
        >>> import jax
        >>> from flax import nnx
        >>> from wrapkit.nnx import WeightNorm, to_linen_variables
        >>> model = WeightNorm(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
        >>> jax.tree.map(jax.numpy.shape, to_linen_variables(model))
        {'params': {'layer_instance': {'bias': (3,), 'kernel': (2, 3)},
                    'layer_instance/kernel/scale': (3,)}}
    """
    subject = f"to_linen_variables({_subject(wrapper)})"
    _check_wrapper(subject, wrapper)
    flat = {key: variable.get_value() for key, variable in _linen_keys(wrapper, subject)}
    return traverse_util.unflatten_dict(flat)  # type: ignore[no-any-return]


def from_linen_variables(wrapper: Wrapper, variables: Mapping[str, Any]) -> None:
    """Sets an NNX wrapper stack's variables, in place, from its Linen twin's.

    The inverse of [`to_linen_variables`][wrapkit.nnx.to_linen_variables]: every variable
    of the stack (but its RNG state) must be in ``variables``, with its shape, and nothing
    else may be; each value is cast to the NNX variable's dtype. A box
    (``nn.Partitioned``) is unboxed; the NNX variable keeps its own metadata. Nothing is
    changed when something does not fit.

    Args:
        wrapper: a wrapkit.nnx wrapper (or stack of them) around one module.
        variables: the Linen twin's variables (``{collection: nested dict}``), e.g. from
            ``wrapkit.linen.WeightNorm(nn.Dense(3)).init(...)``.

    Raises:
        TypeError: for something other than a wrapkit.nnx wrapper.
        ValueError: naming every missing, extra and misshapen variable.

    Examples:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> import wrapkit.linen, wrapkit.nnx
        >>> x = jnp.ones((1, 2))
        >>> twin = wrapkit.linen.WeightNorm(nn.Dense(3))
        >>> variables = twin.init(jax.random.key(0), x)
        >>> model = wrapkit.nnx.WeightNorm(nnx.Linear(2, 3, rngs=nnx.Rngs(1)))
        >>> wrapkit.nnx.from_linen_variables(model, variables)
        >>> bool(jnp.allclose(model(x), twin.apply(variables, x)))
        True
    """
    subject = f"from_linen_variables({_subject(wrapper)})"
    _check_wrapper(subject, wrapper)
    if not isinstance(variables, Mapping):
        raise TypeError(
            f"{subject}: variables must be a mapping of collections, as Linen's init "
            f"returns, got {type(variables).__name__}."
        )
    ours = dict(_linen_keys(wrapper, subject))
    given = {
        key: meta.unbox(leaf)
        # A box (nn.Partitioned) is not a dict: one leaf.
        for key, leaf in traverse_util.flatten_dict(unfreeze(dict(variables))).items()
    }
    expected = {key: variable.get_value() for key, variable in ours.items()}
    problems = _tree_problems(given, expected, check_shapes=True)
    if problems:
        raise ValueError(
            f"{subject}: the variables do not fit the wrapper: {'; '.join(problems)}. Pass "
            "the variables of its Linen twin (the same wrappers around the Linen layer of "
            "the same shapes), e.g. from to_linen_variables or the twin's init."
        )
    for key, variable in ours.items():
        _write(variable, jnp.asarray(given[key]))


def _subject(wrapper: Any) -> str:
    return _describe(wrapper) if isinstance(wrapper, Wrapper) else type(wrapper).__name__


def _check_wrapper(subject: str, wrapper: Any) -> None:
    if not isinstance(wrapper, Wrapper):
        raise TypeError(
            f"{subject}: expected a wrapkit.nnx wrapper (or a stack of them) around one "
            f"module, got {type(wrapper).__module__}.{type(wrapper).__qualname__}."
        )
