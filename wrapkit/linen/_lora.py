"""Low-rank adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, SupportsIndex

import flax.linen as nn
import jax.numpy as jnp
from flax.typing import Dtype, Initializer

from .._family import lora
from .._numerics import lora_scale
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
        return lora.problems(
            self, "nn.initializers.zeros", axes_from_use=True, deterministic_later=False
        )

    def delta_feature_axes(self, leaf: Leaf) -> tuple[int, ...] | None:
        ndim = jnp.ndim(leaf.value)
        if self.feature_axes is None:
            # An embedding table's rows are its inputs, whether it is looked up (rows
            # indexed) or attended to (rows are the outputs of q @ table.T).
            return (ndim - 1,) if isinstance(self.layer_instance, nn.Embed) else None
        return lora.output_axes(
            _describe(self), leaf.path, jnp.shape(leaf.value), self.feature_axes, inferable=True
        )

    def low_rank(
        self,
        leaf: Leaf,
        input_axes: tuple[int, ...],
        output_axes: tuple[int, ...],
        shared_axes: tuple[int, ...] = (),
    ) -> LowRank:
        shape = jnp.shape(leaf.value)
        lora.check_rank(_describe(self), leaf.path, shape, self.rank, input_axes, output_axes)
        a_shape, b_shape = lora.factor_shapes(
            shape, self.rank, input_axes, output_axes, shared_axes
        )
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
            input_fn = lora.dropout_input(self.dropout_rate, self.make_rng("dropout"))
        return LowRank(a, b, self.scale, input_fn, shared=len(shared_axes))

    def invert(self, leaf: Leaf) -> Inverse:
        # A zero B: the delta is zero, so the base weight is the pretrained one as it is.
        return Inverse(leaf.value, {"params": {f"{leaf.path}/lora_b": 0.0}})
