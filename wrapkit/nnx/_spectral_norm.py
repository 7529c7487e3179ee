"""Spectral normalisation for NNX (Miyato et al., https://arxiv.org/abs/1802.05957)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from .._family import spectral_norm
from .._problems import is_bool
from ._wrapper import Inverse, Leaf, NnxFilter, Wrapper, _describe


class SpectralNorm(Wrapper):
    """Spectral normalisation: the inner module sees ``W / sigma(W)``.

    The NNX twin of [`wrapkit.linen.SpectralNorm`][wrapkit.linen.SpectralNorm], with the
    arguments of ``flax.nnx.SpectralNorm``. ``sigma`` is estimated by power iteration from
    a stored vector ``u``. Every ``nnx.Param`` with two or more dimensions is normalised (a
    higher-rank kernel as the matrix ``(-1, shape[-1])``); vectors and scalars pass
    unchanged.

    Unlike flax's class, it never writes the normalised weight into the wrapped module
    (flax issue 5576): the raw ``W`` stays as it is, and every forward pass computes
    ``W / sigma(W)`` from it. The statistics are the wrapper's own ``nnx.BatchStat``s,
    ``self.u[path]`` of shape ``(1, out)`` and ``self.sigma[path]`` of shape ``()``
    (``wrapper.u["kernel"]``), drawn from ``rngs.params()`` as flax draws them, so that the
    same ``rngs`` give the same ``u``. Keyword arguments of a call other than
    ``update_stats`` are passed on to the wrapped module (flax's class drops them).

    Every delegated call takes the keyword ``update_stats``: True stores the new ``u`` and
    ``sigma`` in the wrapper's BatchStats, False leaves them as they are, and ``None`` (the
    default) updates them unless ``use_running_average`` is set: ``.eval()`` and
    ``nnx.view(model, use_running_average=True)`` stop the updates, ``.train()`` resumes
    them.

    The power iteration, ``sigma`` and the division run in at least float32, whatever the
    weight's dtype, and the results are cast once: a zero or tiny float16 or bfloat16 weight
    gives finite outputs, gradients and statistics. In float32 the outputs and statistics
    are flax's.

    Args:
        layer_instance: the module to wrap.
        n_steps: a non-negative int, power-iteration steps per call; 0 disables the
            normalisation.
        epsilon: a finite non-negative number, added to squared norms in the power
            iteration.
        dtype: the dtype of the normalised weights, floating-point or complex (default:
            inferred from the weight and ``u``).
        param_dtype: the dtype of ``u`` and ``sigma``, floating-point or complex (``u`` of
            a complex weight is complex, of at least this precision).
        error_on_non_matrix: True or False: refuse variables of more than two dimensions
            instead of flattening them.
        update_stats: the default of the call option ``update_stats``;
            ``use_running_average`` is set to its negation.
        variable_filter: which Params to consider (default: all); see
            [`Wrapper`][wrapkit.nnx.Wrapper]. Not in flax's class.
        delegates: the inner module's methods to normalise for (default ``("__call__",)``).
        rngs: the keys of the initial ``u`` (``rngs.params()``, one per normalised
            variable); without it, ``jax.random.key(0)`` for each.

    Raises:
        ValueError: when built, listing every option of the wrong type or value, a
            variable of more than two dimensions with ``error_on_non_matrix=True``, or a
            filter that selects nothing.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from wrapkit.nnx import SpectralNorm
        >>> model = SpectralNorm(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1))
        >>> model.u["kernel"].shape, model.sigma["kernel"].shape
        ((1, 3), ())
        >>> y = model(jnp.ones((1, 2)))  # updates model.u and model.sigma
        >>> y = model(jnp.ones((1, 2)), update_stats=False)  # leaves them as they are
    """

    def __init__(
        self,
        layer_instance: nnx.Module,
        *,
        n_steps: int = 1,
        epsilon: float = 1e-12,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        error_on_non_matrix: bool = False,
        update_stats: bool = True,
        variable_filter: NnxFilter = None,
        delegates: Iterable[str] | None = None,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        self.n_steps = n_steps
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.error_on_non_matrix = error_on_non_matrix
        # The attribute .train() and .eval() set (as on flax's SpectralNorm and BatchNorm);
        # a value that is not a bool is kept as given, for argument_errors to report.
        self.use_running_average = (not update_stats) if is_bool(update_stats) else update_stats
        super().__init__(
            layer_instance, variable_filter=variable_filter, delegates=delegates, rngs=rngs
        )

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Called by ``nnx.view``: ``use_running_average=True`` stops the statistics'
        updates in the view (the call option ``update_stats`` still overrides it).

        Args:
            use_running_average: the new value; ``None`` keeps the current one.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def argument_errors(self) -> list[str]:
        problems = spectral_norm.problems(self)
        if not is_bool(self.use_running_average):
            problems.append(
                f"update_stats must be True or False, got {self.use_running_average!r}. "
                "Pass update_stats=False to build the wrapper in eval mode."
            )
        return problems

    def _normalises(self, leaf: Leaf) -> bool:
        if not spectral_norm.normalises(leaf.value, self.n_steps):
            return False
        shape = tuple(jnp.shape(leaf.value))
        spectral_norm.check_matrix(_describe(self), leaf.path, shape, self.error_on_non_matrix)
        return True

    def create(self, leaf: Leaf, rngs: nnx.Rngs | None) -> Mapping[str, nnx.Variable[Any]]:
        if not self._normalises(leaf):
            return {}
        ndim = jnp.ndim(leaf.value)
        # One key per normalised variable, in nnx.to_flat_state order, from a normal of
        # stddev 1e-2: flax's nnx.SpectralNorm draws so, and the same rngs give the same u.
        key = rngs.params() if rngs is not None else jax.random.key(0)
        u_dtype = spectral_norm.u_dtype(leaf.value, self.param_dtype)
        u = nnx.initializers.normal()(key, (1, jnp.shape(leaf.value)[-1]), u_dtype)
        u_metadata = leaf.metadata((ndim - 1,))
        if "out_sharding" in u_metadata:
            u_metadata["out_sharding"] = (None, *u_metadata["out_sharding"])
        return {
            "u": nnx.BatchStat(u, **u_metadata),
            "sigma": nnx.BatchStat(jnp.ones((), self.param_dtype), **leaf.metadata(())),
        }

    # Keyword-only parameters of transform are the wrapper's call options, by design.
    def transform(self, leaf: Leaf, *, update_stats: bool | None = None) -> jax.Array:  # type: ignore[override]
        value = jnp.asarray(leaf.value)
        if not self._normalises(leaf):
            return value
        u_var, sigma_var = self.own("u", leaf), self.own("sigma", leaf)
        normalised, u, sigma = spectral_norm.normalized(
            value, u_var[...], self.n_steps, self.epsilon, self.dtype
        )
        if update_stats is None:
            update_stats = not self.use_running_average
        if update_stats:
            # The wrapper's own statistics; the wrapped module's Params are never written.
            u_var[...], sigma_var[...] = u, sigma
        return normalised

    def invert(self, leaf: Leaf) -> Inverse:
        # W / sigma(W) has largest singular value 1, so only such a W is reproduced (see
        # the caveat); W is kept as it is, with the u and sigma that power iteration
        # converges to.
        value = jnp.asarray(leaf.value)
        if not self._normalises(leaf):
            return Inverse(value)
        u, sigma = spectral_norm.fixed_point(value)
        return Inverse(
            value,
            {"u": u, "sigma": sigma},
            caveat=f"{_describe(self)} divides the weight by its largest singular value "
            "(the norm ratio is 1 / sigma), so it reproduces only weights whose largest "
            "singular value is 1.",
        )
