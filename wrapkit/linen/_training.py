"""Which parameters of a wrapped model train: labels for optax, from one abstract trace."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import flax.linen as nn
import jax
from flax import traverse_util

from .._summary.data import VariableStats
from ._wrapper import _RECORD, _adds_low_rank, _Seen

Kind = Literal["base", "frozen", "adapter", "wrapper"]
KINDS: tuple[Kind, ...] = ("base", "frozen", "adapter", "wrapper")


def param_labels(
    model: nn.Module,
    *args: Any,
    variables: Any = None,
    rngs: Any = None,
    method: str | Callable[..., Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Labels every parameter of a wrapped model by what it is, for optax.

    One abstract trace of ``model.init`` (nothing is allocated or run; inputs may be
    ``jax.ShapeDtypeStruct``s) finds every wrapper the call reaches and the variables each
    transforms. Each parameter gets one label:

    * ``"adapter"``: a parameter of a wrapper that adds a low-rank delta
      ([`LoRA`][wrapkit.linen.LoRA]'s ``lora_a`` and ``lora_b``);
    * ``"wrapper"``: another wrapper's own parameter (a [`WeightNorm`][wrapkit.linen.WeightNorm]
      scale);
    * ``"frozen"``: a base weight that a low-rank wrapper with ``freeze_base=True`` adapts (its
      gradient is stopped already; the label lets the optimizer skip it too);
    * ``"base"``: every other parameter of the model.

    Args:
        model: the Linen model, wrappers anywhere inside.
        *args: the arguments of a call, arrays or ``jax.ShapeDtypeStruct``s.
        variables: the model's variables, to label them as they are (default: an abstract
            ``init``); only their structure is read.
        rngs: PRNG keys for ``init`` (default: a ``params`` key).
        method: the method to call, as for ``Module.init``.
        **kwargs: keyword arguments of the call.

    Returns:
        A tree like ``variables["params"]`` with a label string at each leaf, to pass to
        ``optax.multi_transform`` (or to [`train_labels`][wrapkit.linen.train_labels]).

    Examples:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from wrapkit.linen import LoRA, param_labels
        >>> model = LoRA(nn.Dense(3), rank=1)
        >>> labels = param_labels(model, jax.ShapeDtypeStruct((1, 2), jnp.float32))
        >>> labels["layer_instance"], labels["layer_instance/kernel/lora_a"]
        ({'bias': 'base', 'kernel': 'frozen'}, 'adapter')
    """
    frozen: set[tuple[str, ...]] = set()
    wrappers: dict[tuple[str, ...], bool] = {}  # wrapper path -> adds a low-rank delta

    def record(seen: _Seen) -> None:
        for wrapper, _ in seen.chain:
            low_rank = _adds_low_rank(wrapper)
            wrappers[tuple(wrapper.path)] = low_rank
            if seen.collection == "params" and low_rank and wrapper.freeze_base:
                frozen.add(seen.path)

    def init(rngs: Any, *args: Any) -> Any:
        return model.init(rngs, *args, method=method, **kwargs)

    token = _RECORD.set(record)
    try:
        found = jax.eval_shape(init, jax.random.key(0) if rngs is None else rngs, *args)
    finally:
        _RECORD.reset(token)
    params = (found if variables is None else variables).get("params", {})

    def label(path: tuple[str, ...]) -> Kind:
        if path in frozen:
            return "frozen"
        for depth in range(len(path) - 1, -1, -1):
            if path[:depth] in wrappers and "/" in path[depth]:
                return "adapter" if wrappers[path[:depth]] else "wrapper"
        return "base"

    flat = traverse_util.flatten_dict(dict(params), keep_empty_nodes=False)
    return traverse_util.unflatten_dict({path: label(path) for path in flat})


def train_labels(labels: Any, train: Iterable[Kind] | Kind = ("adapter",)) -> Any:
    """``"train"`` where a label of [`param_labels`][wrapkit.linen.param_labels] is in
    ``train``, ``"freeze"`` elsewhere: the labels of a one-line optimizer.

    Examples:
        >>> import optax
        >>> from wrapkit.linen import train_labels
        >>> labels = {"Dense_0": {"kernel": "frozen", "bias": "base"}, "a": "adapter"}
        >>> train_labels(labels)
        {'Dense_0': {'bias': 'freeze', 'kernel': 'freeze'}, 'a': 'train'}
        >>> tx = optax.multi_transform(
        ...     {"train": optax.adam(1e-3), "freeze": optax.set_to_zero()}, train_labels(labels)
        ... )
    """
    kinds = {train} if isinstance(train, str) else set(train)
    unknown = sorted(kinds - set(KINDS))
    if unknown:
        raise ValueError(
            f"train_labels: unknown kinds {unknown}; the kinds are {list(KINDS)} (see "
            "param_labels)."
        )
    return jax.tree_util.tree_map(lambda kind: "train" if kind in kinds else "freeze", labels)


def adapter_params(params: Any, labels: Any) -> dict[str, Any]:
    """The parameters labelled ``"adapter"``, as a nested dict: what an adapter checkpoint holds.

    Args:
        params: the model's parameters (``variables["params"]``).
        labels: their labels, from [`param_labels`][wrapkit.linen.param_labels].

    Returns:
        The same nesting as ``params``, with only the adapters' leaves (and the dicts on the
        way to them): a few percent of the model, to save with ``flax.serialization`` or
        orbax and load back with [`merge_params`][wrapkit.linen.merge_params].
    """
    flat = traverse_util.flatten_dict(dict(params))
    kinds = traverse_util.flatten_dict(dict(labels))
    return traverse_util.unflatten_dict(
        {path: value for path, value in flat.items() if kinds.get(path) == "adapter"}
    )


def merge_params(params: Any, part: Any) -> dict[str, Any]:
    """``params`` with the leaves of ``part`` (an adapter checkpoint) put in their places.

    Raises:
        ValueError: a path of ``part`` is not in ``params``, or its shape or dtype differs
            (an adapter saved from another model, or with another rank), naming each.
    """
    flat = traverse_util.flatten_dict(dict(params))
    problems = []
    for path, value in traverse_util.flatten_dict(dict(part)).items():
        name = "/".join(path)
        if path not in flat:
            problems.append(f"{name!r} is not a parameter of the model")
        elif (jax.numpy.shape(value), jax.numpy.result_type(value)) != (
            jax.numpy.shape(flat[path]),
            jax.numpy.result_type(flat[path]),
        ):
            problems.append(
                f"{name!r} has shape {jax.numpy.shape(value)} {jax.numpy.result_type(value)}, "
                f"the model's {jax.numpy.shape(flat[path])} {jax.numpy.result_type(flat[path])}"
            )
        else:
            flat[path] = value
    if problems:
        raise ValueError(
            "merge_params: the parameters to merge do not fit the model: "
            + "; ".join(problems)
            + ". Load an adapter saved from the same model, with the same ranks."
        )
    return traverse_util.unflatten_dict(flat)


def label_counts(labels: Any, params: Any, under: tuple[str, ...] = ()) -> dict[str, VariableStats]:
    """Parameter counts and bytes per label, for the whole model or one module's subtree.

    With a [`summary`][wrapkit.summary] row's ``path`` as ``under``, it says how many of that
    row's parameters are adapters, wrapper parameters, frozen or base weights (a wrapper's row
    has its own parameters; the wrapped layer's row, the layer's).

    Examples:
        >>> import jax.numpy as jnp
        >>> from wrapkit.linen import label_counts
        >>> params = {"Dense_0": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
        >>> labels = {"Dense_0": {"kernel": "frozen", "bias": "base"}}
        >>> {kind: stats.count for kind, stats in label_counts(labels, params).items()}
        {'base': 3, 'frozen': 12}
    """
    kinds = traverse_util.flatten_dict(dict(labels))
    counts: dict[str, VariableStats] = {}
    for path, value in traverse_util.flatten_dict(dict(params)).items():
        if path[: len(under)] == tuple(under):
            kind = kinds[path]
            counts[kind] = counts.get(kind, VariableStats()) + VariableStats.of(value)
    return dict(sorted(counts.items()))
