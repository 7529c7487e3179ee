"""Spectral normalisation (Miyato et al., https://arxiv.org/abs/1802.05957)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax.linen.dtypes import canonicalize_dtype
from flax.typing import Dtype

from .._filters import VariableFilter
from .._numerics import power_iteration, spectral_normalize
from ._wrapper import Leaf, Wrapper, _describe


class SpectralNorm(Wrapper):
    """Spectral normalisation: the inner module sees ``W / sigma(W)``.

    ``sigma`` is estimated by power iteration from a stored vector ``u``. Every variable
    with two or more dimensions is normalised (a higher-rank kernel as the matrix
    ``(-1, shape[-1])``); vectors and scalars pass unchanged.

    A drop-in for ``flax.linen.SpectralNorm``: the same arguments, the same variables
    (``"<inner name>/<path>/u"`` of shape ``(1, out)`` and ``".../sigma"`` of shape ``()`` in
    ``collection_name``), the same outputs and the same updated statistics. Every delegated
    call takes the keyword ``update_stats``: True stores the new ``u`` and ``sigma`` (the
    collection must then be mutable), False leaves them as they are.

    Attributes:
        layer_instance: the module to wrap.
        n_steps: power-iteration steps per call; 0 disables the normalisation.
        epsilon: added to squared norms in the power iteration.
        dtype: the dtype of the normalised weights (default: inferred).
        param_dtype: the dtype of ``u`` and ``sigma``.
        error_on_non_matrix: raise on variables of more than two dimensions instead of
            flattening them.
        collection_name: the collection holding ``u`` and ``sigma``.
        variable_filter: which variables to consider (default: all); see
            [`Wrapper`][wrapkit.linen.Wrapper]. Not in flax's class.
        delegates: the inner module's methods to normalise for (default ``("__call__",)``).

    Examples:
        >>> import flax.linen as nn, jax, jax.numpy as jnp
        >>> from wrapkit.linen import SpectralNorm
        >>> model = SpectralNorm(nn.Dense(3))
        >>> x = jnp.ones((1, 2))
        >>> variables = model.init(jax.random.key(0), x, update_stats=False)
        >>> jax.tree_util.tree_map(jnp.shape, variables["batch_stats"])
        {'layer_instance/kernel/sigma': (), 'layer_instance/kernel/u': (1, 3)}
        >>> y, updates = model.apply(variables, x, update_stats=True, mutable=["batch_stats"])
    """

    n_steps: int = 1
    epsilon: float = 1e-12
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    error_on_non_matrix: bool = False
    collection_name: str = "batch_stats"
    variable_filter: VariableFilter = dataclasses.field(default=None, kw_only=True)

    def argument_errors(self) -> list[str]:
        if isinstance(self.n_steps, int) and self.n_steps >= 0:
            return []
        return [f"n_steps must be a non-negative int (0 disables it), got {self.n_steps!r}."]

    # Keyword-only parameters of transform are the wrapper's call options, by design.
    def transform(self, leaf: Leaf, *, update_stats: bool) -> jax.Array:  # type: ignore[override]
        value = jnp.asarray(leaf.value)
        shape = value.shape
        if value.ndim <= 1 or self.n_steps < 1:
            return value
        if value.ndim > 2:
            if self.error_on_non_matrix:
                raise ValueError(
                    f"{_describe(self)}: {leaf.path!r} has "
                    f"{value.ndim} dimensions {shape}, but error_on_non_matrix=True. Pass "
                    "error_on_non_matrix=False to normalise it as a matrix of shape "
                    f"{(-1, shape[-1])}, or exclude it with variable_filter."
                )
            value = jnp.reshape(value, (-1, shape[-1]))
        if update_stats and not self.is_mutable_collection(self.collection_name):
            raise ValueError(
                f"{_describe(self)} was called with "
                f"update_stats=True, but the collection {self.collection_name!r} is not "
                f"mutable. Pass mutable=[{self.collection_name!r}] to apply, or "
                "update_stats=False."
            )

        col = self.collection_name
        u_name, sigma_name = f"{leaf.path}/u", f"{leaf.path}/sigma"
        key = None if self.has_variable(col, u_name) else self.make_rng("params")
        u_var = self.variable(
            col, u_name, jax.random.normal, key, (1, value.shape[-1]), self.param_dtype
        )
        sigma_var = self.variable(col, sigma_name, jnp.ones, (), self.param_dtype)
        u, v = power_iteration(value, u_var.value, self.n_steps, self.epsilon)
        normalised, sigma = spectral_normalize(value, u, v)
        if update_stats:
            u_var.value = u
            sigma_var.value = sigma
        dtype = canonicalize_dtype(leaf.value, u, v, sigma, dtype=self.dtype)
        return jnp.asarray(normalised.reshape(shape), dtype)
