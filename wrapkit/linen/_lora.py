"""Low-rank adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, SupportsIndex

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer

from .._numerics import canonical_axes, dropout, lora_scale
from .._problems import dtype_error, is_bool, is_index
from .._unmerged import LowRank
from ._wrapper import Inverse, Leaf, Wrapper, _describe


class LoRA(Wrapper):
    """Low-rank adaptation: the inner module sees ``W + s * A @ B``, computed unmerged.

    For each selected weight ``W`` this module holds two factors, ``A`` over the weight's
    input axes and ``B`` over its output axes, and ``s = alpha / rank`` (rsLoRA,
    Kalajdzievski 2023: ``alpha / sqrt(rank)``). ``B`` starts at zero, so a wrapped model
    starts with the outputs of the model it wraps.

    The layer is never run on ``W + s * A @ B``: every linear use of ``W`` in the inner call
    (``x @ W`` in Dense, DenseGeneral, Einsum and ``Embed.attend``; a convolution; the row
    lookup of ``Embed.__call__``) is computed as ``f(x; W) + s * f(x; A @ B)``, the second
    term through the factors (``(x @ A) @ B``; ``conv(x, A) @ B``; ``A[ids] @ B``). So the
    forward pass never forms ``A @ B``, and with the base weight frozen the backward pass
    never computes the full-size weight gradient ``x^T dy``: the cost of LoRA is the cost of
    its factors. A use without such a form (the weight normalised, squared, sliced) raises,
    or with ``materialize=True`` runs on ``W + s * A @ B``.

    The input and output axes of a weight are read from its first use: the axes it
    contracts with the input (or, for a lookup, the axes it indexes) are its input axes.
    ``A`` of a Dense kernel ``(in, out)`` is ``(in, rank)``, of a Conv kernel
    ``(h, w, in, out)`` it is ``(h, w, in, rank)`` (a convolution to ``rank`` channels
    followed by a 1x1 one, as in LoRA for convolutions), of an Einsum kernel ``"dnh"`` used
    as ``"btd,dnh->btnh"`` it is ``(d, rank)`` with ``B`` of shape ``(rank, n, h)``; an
    embedding table ``(vocab, features)`` gets ``A`` of ``(vocab, rank)`` whichever method
    is called first.

    The factors are this module's parameters, ``"<inner name>/<path>/lora_a"`` and
    ``".../lora_b"`` (the naming wrapkit's other wrappers use), so they are separable from
    the base weights by name.

    Attributes:
        layer_instance: the module to wrap.
        rank: the rank ``r`` of the delta, a positive int, at most the size of the
            weight's input and of its output axes.
        alpha: the scaling numerator, a positive number; ``None`` means ``rank`` (``s = 1``).
        rslora: ``s = alpha / sqrt(rank)`` instead of ``alpha / rank``.
        a_init: initialiser of ``A`` (default: uniform in ``±1/sqrt(fan_in)``, as the
            paper's code and torch's ``Linear``).
        b_init: initialiser of ``B`` (default: zeros, so outputs start unchanged).
        dropout_rate: dropout on the adapter's input, in ``[0, 1)``; the base path is
            unaffected.
        deterministic: with ``dropout_rate > 0``, whether dropout is off (``True``, for
            evaluation) or on (``False``; the call then needs a ``"dropout"`` PRNG key).
        param_dtype: the dtype of ``A`` and ``B``.
        feature_axes: the weight's output axes, when they should not be read from its
            first use (an int or a tuple of ints); ``None`` infers them.
        freeze_base: stop the gradient of the base weights that take a delta (default), so
            that only the adapter trains; False lets ``W`` train too.
        materialize: for a use without an unmerged form, run it on ``W + s * A @ B``
            instead of raising.
        variable_filter: which variables take a delta (default ``{"kernel",
            "embedding"}``); see [`Wrapper`][wrapkit.linen.Wrapper].
        delegates: the inner module's methods to adapt (default ``("__call__",)``; for a
            tied embedding, ``("__call__", "attend")``).

    Raises:
        ValueError: when built, listing every option of the wrong type or value; in a
            call, for a rank larger than a weight's input or output size, or a use of a
            weight without an unmerged form (unless ``materialize=True``).

    Examples:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from wrapkit.linen import LoRA
        >>> model = LoRA(nn.Dense(3), rank=2)
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
        >>> for name, value in variables["params"].items():
        ...     print(name, jax.tree_util.tree_map(jnp.shape, value))
        layer_instance {'bias': (3,), 'kernel': (4, 3)}
        layer_instance/kernel/lora_a (4, 2)
        layer_instance/kernel/lora_b (2, 3)
    """

    rank: int = 8
    alpha: float | None = None
    rslora: bool = False
    a_init: Initializer = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    b_init: Initializer = nn.initializers.zeros
    dropout_rate: float = 0.0
    deterministic: bool | None = None
    param_dtype: Dtype = jnp.float32
    feature_axes: SupportsIndex | Sequence[SupportsIndex] | None = None
    freeze_base: bool = True
    materialize: bool = False
    variable_filter: Iterable[Any] | None = dataclasses.field(
        default_factory=lambda: {"kernel", "embedding"}
    )

    @property
    def scale(self) -> float:
        """The factor ``s`` of the delta ``s * A @ B``."""
        return lora_scale(self.rank, self.alpha, rslora=self.rslora)

    def argument_errors(self) -> list[str]:
        problems = []
        if not (is_index(self.rank) and self.rank >= 1):
            problems.append(f"rank must be a positive int, got {self.rank!r}. Pass e.g. rank=8.")
        alpha = self.alpha
        if alpha is not None and not (
            isinstance(alpha, numbers.Real)
            and not is_bool(alpha)
            and math.isfinite(alpha)
            and alpha > 0
        ):
            problems.append(
                f"alpha must be a positive number or None (alpha = rank), got {alpha!r}. "
                "Pass e.g. alpha=16."
            )
        rate = self.dropout_rate
        if not (isinstance(rate, numbers.Real) and not is_bool(rate) and 0 <= rate < 1):
            problems.append(
                f"dropout_rate must be a number in [0, 1), got {rate!r}. Pass 0.0 for no "
                "dropout on the adapter path."
            )
        elif rate > 0 and not is_bool(self.deterministic):
            problems.append(
                f"dropout_rate={rate!r} needs deterministic=True or False (got "
                f"{self.deterministic!r}): False applies dropout (and needs a 'dropout' "
                "PRNG key), True turns it off for evaluation."
            )
        for name in ("rslora", "freeze_base", "materialize"):
            if not is_bool(getattr(self, name)):
                problems.append(f"{name} must be True or False, got {getattr(self, name)!r}.")
        for name in ("a_init", "b_init"):
            if not callable(getattr(self, name)):
                problems.append(
                    f"{name} must be an initializer called as {name}(key, shape, dtype), got "
                    f"{getattr(self, name)!r}. Pass e.g. nn.initializers.zeros."
                )
        axes = self.feature_axes
        if not (
            axes is None
            or is_index(axes)
            or (isinstance(axes, Sequence) and axes and all(is_index(axis) for axis in axes))
        ):
            problems.append(
                f"feature_axes must be None (inferred), an int or a non-empty tuple of ints, "
                f"got {axes!r}."
            )
        if (error := dtype_error("param_dtype", self.param_dtype, optional=False)) is not None:
            problems.append(error)
        return problems

    def delta_feature_axes(self, leaf: Leaf) -> tuple[int, ...] | None:
        ndim = jnp.ndim(leaf.value)
        if self.feature_axes is None:
            # An embedding table's rows are its inputs, whether it is looked up (rows
            # indexed) or attended to (rows are the outputs of q @ table.T).
            return (ndim - 1,) if isinstance(self.layer_instance, nn.Embed) else None
        axes = canonical_axes(ndim, self.feature_axes)
        if axes is None or len(axes) == ndim:
            raise ValueError(
                f"{_describe(self)}: feature_axes={self.feature_axes!r} does not leave an "
                f"input axis of {leaf.path!r} of shape {jnp.shape(leaf.value)}. Use output "
                f"axes in [{-ndim}, {ndim - 1}] that are not all of them, or None to infer."
            )
        return axes

    def low_rank(
        self,
        leaf: Leaf,
        input_axes: tuple[int, ...],
        output_axes: tuple[int, ...],
        shared_axes: tuple[int, ...] = (),
    ) -> LowRank:
        shape = jnp.shape(leaf.value)
        fan_in = math.prod(shape[axis] for axis in input_axes)
        fan_out = math.prod(shape[axis] for axis in output_axes)
        if self.rank > min(fan_in, fan_out):
            raise ValueError(
                f"{_describe(self)}: rank={self.rank} is larger than {leaf.path!r} of shape "
                f"{shape} allows: its input axes {input_axes} hold {fan_in} values and its "
                f"output axes {output_axes} hold {fan_out}. Use rank <= {min(fan_in, fan_out)}."
            )
        shared = tuple(shape[axis] for axis in shared_axes)
        a_shape = (*shared, *(shape[axis] for axis in input_axes), self.rank)
        b_shape = (*shared, self.rank, *(shape[axis] for axis in output_axes))
        a_init, b_init = self.a_init, self.b_init
        if isinstance(leaf.metadata, nn.Partitioned):
            # The factors are sharded like the weight's axes they span; the rank is not.
            names = leaf.metadata.names
            experts = tuple(names[i] for i in shared_axes)
            a_init = nn.with_partitioning(a_init, (*experts, *(names[i] for i in input_axes), None))
            b_init = nn.with_partitioning(
                b_init, (*experts, None, *(names[i] for i in output_axes))
            )
        a = self.param(f"{leaf.path}/lora_a", a_init, a_shape, self.param_dtype)
        b = self.param(f"{leaf.path}/lora_b", b_init, b_shape, self.param_dtype)
        input_fn = None
        if self.dropout_rate > 0 and not self.deterministic:
            key = self.make_rng("dropout")
            rate = self.dropout_rate

            def input_fn(x: jax.Array) -> jax.Array:
                return dropout(x, rate, key)

        return LowRank(a, b, self.scale, input_fn, shared=len(shared_axes))

    def invert(self, leaf: Leaf) -> Inverse:
        # A zero B: the delta is zero, so the base weight is the pretrained one as it is.
        return Inverse(leaf.value, {"params": {f"{leaf.path}/lora_b": 0.0}})
