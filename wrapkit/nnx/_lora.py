"""Low-rank adaptation for NNX (Hu et al. 2021, https://arxiv.org/abs/2106.09685)."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, SupportsIndex

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer

from .._family import lora
from .._numerics import lora_scale
from .._problems import is_bool
from .._unmerged import LowRank
from ._wrapper import _REQUIRED, Inverse, Leaf, NnxFilter, Wrapper, _describe

# Uniform in ±1/sqrt(fan_in), as the LoRA paper's code, torch's Linear and wrapkit.linen.LoRA:
# variance 1/(3 fan_in). One object, so that every LoRA's graph definition holds the same.
UNIFORM_FAN_IN = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class LoRA(Wrapper):
    """Low-rank adaptation: the inner module sees ``W + s * A @ B``, computed unmerged.

    The NNX twin of [`wrapkit.linen.LoRA`][wrapkit.linen.LoRA]. For each selected weight
    ``W`` it holds two factors, ``A`` over the weight's input axes and ``B`` over its output
    axes, and ``s = alpha / rank`` (rsLoRA, Kalajdzievski 2023: ``alpha / sqrt(rank)``).
    ``B`` starts at zero, so a wrapped model starts with the outputs of the model it wraps.

    The layer is never run on ``W + s * A @ B``: every linear use of ``W`` in the inner call
    (``x @ W`` in Linear, LinearGeneral, Einsum and ``Embed.attend``; a convolution; the row
    lookup of ``Embed.__call__``) is computed as ``f(x; W) + s * f(x; A @ B)``, the second
    term through the factors, so neither the forward pass nor, with the base frozen, the
    backward pass forms a full-size product. A use without such a form (the weight
    normalised, squared, sliced) raises, or with ``materialize=True`` runs on
    ``W + s * A @ B``.

    NNX makes variables when a module is built, so the factors are made here, not at a
    first use: a weight's output axes are ``feature_axes`` (default: the last axis) and its
    input axes are the others. ``A`` of a Linear kernel ``(in, out)`` is ``(in, rank)``, of
    a Conv kernel ``(h, w, in, out)`` it is ``(h, w, in, rank)``, of an Einsum kernel
    ``"dnh"`` with ``feature_axes=(1, 2)`` it is ``(d, rank)`` and ``B`` is
    ``(rank, n, h)``; an embedding table ``(vocab, features)`` gets ``A`` of
    ``(vocab, rank)``, for the lookup and ``attend`` alike. A use that contracts other
    axes than the input axes (or the output axes, as ``attend`` does) raises and names the
    ``feature_axes`` that would fit.

    The factors are ``variable_type`` Variables, default ``nnx.LoRAParam`` (a ``Param``),
    in ``self.lora_a`` and ``self.lora_b`` keyed by the weight's path
    (``model.lora_a["kernel"]``), sharded like the weight's axes they span; so
    ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` trains the adapters alone.

    Args:
        layer_instance: the module to wrap.
        rank: the rank ``r`` of the delta, a positive int, at most the size of the
            weight's input and of its output axes.
        alpha: the scaling numerator, a positive number; ``None`` means ``rank`` (``s = 1``).
        rslora: ``s = alpha / sqrt(rank)`` instead of ``alpha / rank``.
        a_init: initialiser of ``A`` (default: uniform in ``±1/sqrt(fan_in)``, as the
            paper's code, torch's ``Linear`` and ``wrapkit.linen.LoRA``).
        b_init: initialiser of ``B`` (default: zeros, so outputs start unchanged).
        dropout_rate: dropout on the adapter's input, in ``[0, 1)``; the base path is
            unaffected.
        deterministic: with ``dropout_rate > 0``, whether dropout is off (``True``) or on
            (``False``); ``.train()`` and ``.eval()`` set it, and a call's
            ``deterministic=`` keyword (taken by the wrapper, not passed on) overrides it.
        param_dtype: the dtype of ``A`` and ``B``.
        feature_axes: the weights' output axes, an int or a tuple of ints.
        freeze_base: stop the gradient of the base weights that take a delta (default), so
            that only the adapter trains; False lets ``W`` train too.
        materialize: for a use without an unmerged form, run it on ``W + s * A @ B``
            instead of raising.
        variable_type: the ``nnx.Variable`` type of the factors.
        variable_filter: which variables take a delta (default ``("kernel",
            "embedding")``; nnx filters are accepted too).
        delegates: the inner module's methods to adapt (default ``("__call__",)``; for a
            tied embedding, ``("__call__", "attend")``).
        rngs: the keys of ``a_init`` and ``b_init`` (``rngs.params()``), and with
            ``dropout_rate > 0`` the stream of dropout keys (``rngs.dropout``, forked).

    Raises:
        TypeError: when ``rngs`` is not an ``nnx.Rngs``.
        ValueError: when built, listing every option of the wrong type or value, a rank
            larger than a weight's input or output size, ``feature_axes`` out of range, or a
            filter that selects nothing; in a call, a use of a weight without an unmerged
            form (unless ``materialize=True``), or dropout with ``deterministic`` unset.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from wrapkit.nnx import LoRA
        >>> model = LoRA(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(1))
        >>> model.lora_a["kernel"].shape, model.lora_b["kernel"].shape
        ((4, 2), (2, 3))
        >>> type(model.lora_a["kernel"]).__name__
        'LoRAParam'
        >>> x = jnp.ones((1, 4))
        >>> bool((model(x) == model.layer_instance(x)).all())  # B is zero: unchanged
        True
    """

    default_filter = ("kernel", "embedding")
    construction_only = ("a_init", "b_init")

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        rank: int = 8,
        alpha: float | None = None,
        rslora: bool = False,
        a_init: Initializer = UNIFORM_FAN_IN,
        b_init: Initializer = nnx.initializers.zeros,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        param_dtype: Dtype = jnp.float32,
        feature_axes: SupportsIndex | Sequence[SupportsIndex] = -1,
        freeze_base: bool = True,
        materialize: bool = False,
        variable_type: type[nnx.Variable[Any]] = nnx.LoRAParam,
        variable_filter: NnxFilter = _REQUIRED,
        delegates: Iterable[str] | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        _check_rngs(f"LoRA({type(layer_instance).__name__})", rngs)
        self.rank = rank
        self.alpha = alpha
        self.rslora = rslora
        self.a_init = a_init
        self.b_init = b_init
        self.dropout_rate = dropout_rate
        self.deterministic = deterministic
        self.param_dtype = param_dtype
        # Static attributes are part of the graph definition, which must hash.
        self.feature_axes = tuple(feature_axes) if isinstance(feature_axes, list) else feature_axes
        self.freeze_base = freeze_base
        self.materialize = materialize
        self.variable_type = variable_type
        drops = isinstance(dropout_rate, numbers.Real) and not is_bool(dropout_rate)
        # As nnx.Dropout: a stream of its own, one key per call.
        self.rngs: nnx.RngStream | None = (
            rngs["dropout"].fork() if drops and dropout_rate > 0 else nnx.data(None)
        )
        super().__init__(
            layer_instance, variable_filter=variable_filter, delegates=delegates, rngs=rngs
        )

    @property
    def scale(self) -> float:
        """The factor ``s`` of the delta ``s * A @ B``."""
        return lora_scale(self.rank, self.alpha, rslora=self.rslora)

    def argument_errors(self) -> list[str]:
        found = lora.problems(
            self, "nnx.initializers.zeros", axes_from_use=False, deterministic_later=True
        )
        kind = self.variable_type
        if not (isinstance(kind, type) and issubclass(kind, nnx.Variable)):
            found.append(
                "variable_type must be an nnx.Variable subclass (default nnx.LoRAParam, "
                f"which nnx.Optimizer(..., wrt=nnx.LoRAParam) selects), got {kind!r}."
            )
        return found

    def _axes(self, leaf: Leaf) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The weight's input and output axes, fixed when the factors are made."""
        shape = tuple(jnp.shape(leaf.value))
        outputs = lora.output_axes(
            _describe(self), leaf.path, shape, self.feature_axes, inferable=False
        )
        return tuple(axis for axis in range(len(shape)) if axis not in outputs), outputs

    def create(self, leaf: Leaf, rngs: nnx.Rngs | None) -> Mapping[str, nnx.Variable[Any]]:
        rngs = _check_rngs(_describe(self), rngs)
        shape = tuple(jnp.shape(leaf.value))
        inputs, outputs = self._axes(leaf)
        lora.check_rank(_describe(self), leaf.path, shape, self.rank, inputs, outputs)
        a_shape, b_shape = lora.factor_shapes(shape, self.rank, inputs, outputs)
        a = self.a_init(rngs.params(), a_shape, self.param_dtype)
        b = self.b_init(rngs.params(), b_shape, self.param_dtype)
        return {
            "lora_a": self.variable_type(a, **_sharding(leaf, inputs, rank_first=False)),
            "lora_b": self.variable_type(b, **_sharding(leaf, outputs, rank_first=True)),
        }

    def delta_feature_axes(self, leaf: Leaf) -> tuple[int, ...]:
        return self._axes(leaf)[1]

    def low_rank(
        self,
        leaf: Leaf,
        input_axes: tuple[int, ...],
        output_axes: tuple[int, ...],
        shared_axes: tuple[int, ...] = (),
        *,
        deterministic: bool | None = None,
    ) -> LowRank:
        a = self.own("lora_a", leaf)[...]
        b = self.own("lora_b", leaf)[...]
        if shared_axes:
            # A use that batches over axes of the weight (experts) takes one delta per
            # slice: A's slices are A's rows there, and every slice shares B.
            stored = self._axes(leaf)[0]
            order = [stored.index(axis) for axis in (*shared_axes, *input_axes)]
            a = jnp.transpose(a, (*order, a.ndim - 1))
            shared = tuple(jnp.shape(leaf.value)[axis] for axis in shared_axes)
            b = jnp.broadcast_to(b, (*shared, *b.shape))
        input_fn = None
        if self.dropout_rate > 0 and not self._deterministic(deterministic):
            input_fn = lora.dropout_input(self.dropout_rate, self._dropout_key())
        return LowRank(a, b, self.scale, input_fn, shared=len(shared_axes))

    def set_view(self, deterministic: bool | None = None) -> None:
        """Sets ``deterministic`` in a view of the model (``nnx.view(model,
        deterministic=True)``), as ``nnx.Dropout`` does.

        Args:
            deterministic: whether dropout is off; ``None`` leaves it as it is.
        """
        if deterministic is not None:
            self.deterministic = deterministic

    def _dropout_key(self) -> jax.Array:
        if self.rngs is None:
            raise ValueError(
                f"{_describe(self)} has dropout_rate={self.dropout_rate!r} but no stream of "
                "dropout keys: it was built with dropout_rate=0.0. Build it with the "
                "dropout_rate it should use."
            )
        return self.rngs()

    def _deterministic(self, given: bool | None) -> bool:
        found = self.deterministic if given is None else given
        if not is_bool(found):
            raise ValueError(
                f"{_describe(self)} has dropout_rate={self.dropout_rate!r}, but deterministic "
                f"is {found!r}: call model.train() (dropout on) or model.eval() (off), build "
                "it with deterministic=True or False, or pass deterministic= to the call."
            )
        return bool(found)

    def invert(self, leaf: Leaf) -> Inverse:
        # A zero B: the delta is zero, so the base weight is the pretrained one as it is.
        b = self.own("lora_b", leaf)[...]
        return Inverse(leaf.value, {"lora_b": jnp.zeros_like(b)})


def _check_rngs(subject: str, rngs: Any) -> nnx.Rngs:
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(
            f"{subject} needs rngs=nnx.Rngs(...) for the initial values of its factors, got "
            f"{rngs!r} ({type(rngs).__name__}). Pass e.g. rngs=nnx.Rngs(0)."
        )
    return rngs


def _sharding(leaf: Leaf, axes: tuple[int, ...], *, rank_first: bool) -> dict[str, Any]:
    """A factor's sharding metadata: the weight's for the axes it spans; the rank unsharded."""
    metadata = leaf.metadata(axes)
    names = metadata.get("out_sharding")
    if names is not None:
        metadata["out_sharding"] = (None, *names) if rank_first else (*names, None)
    return metadata
