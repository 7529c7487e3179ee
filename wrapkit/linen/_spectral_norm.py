"""Spectral normalisation (Miyato et al., https://arxiv.org/abs/1802.05957)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax.typing import Dtype

from .._family import spectral_norm
from .._filters import VariableFilter
from ._wrapper import Inverse, Leaf, Wrapper, _describe


class SpectralNorm(Wrapper):
    """Spectral normalisation: the inner module sees ``W / sigma(W)``.

    ``sigma`` is estimated by power iteration from a stored vector ``u``. Every variable
    with two or more dimensions is normalised (a higher-rank kernel as the matrix
    ``(-1, shape[-1])``); vectors and scalars pass unchanged.

    A drop-in for ``flax.linen.SpectralNorm``: the same arguments, the same variables
    (``"<inner name>/<path>/u"`` of shape ``(1, out)`` and ``".../sigma"`` of shape ``()`` in
    ``collection_name``), and in float32 the same outputs and the same updated statistics,
    to the last bit. Every delegated call takes the keyword ``update_stats``: True stores
    the new ``u`` and ``sigma`` (the collection must then be mutable), False leaves them as
    they are.

    The power iteration, ``sigma`` and the division run in at least float32, whatever the
    weight's dtype, and the results are cast once: a zero or tiny float16 or bfloat16 weight
    gives finite outputs, gradients and statistics. A complex weight is divided by its
    largest singular value (the iteration uses the conjugate transpose); its ``u`` is
    complex and ``sigma`` real.

    Attributes:
        layer_instance: the module to wrap.
        n_steps: a non-negative int, power-iteration steps per call; 0 disables the
            normalisation.
        epsilon: a finite non-negative number, added to squared norms in the power
            iteration.
        dtype: the dtype of the normalised weights, floating-point or complex (default:
            inferred).
        param_dtype: the dtype of ``u`` and ``sigma``, floating-point or complex (``u`` of
            a complex weight is complex, of at least this precision).
        error_on_non_matrix: True or False: raise on variables of more than two dimensions
            instead of flattening them.
        collection_name: a non-empty string, the collection holding ``u`` and ``sigma``.
        variable_filter: which variables to consider (default: all); see
            [`Wrapper`][wrapkit.linen.Wrapper]. Not in flax's class.
        delegates: the inner module's methods to normalise for (default ``("__call__",)``).

    Raises:
        ValueError: when built, listing every option of the wrong type or value (each with
            the module, what was expected and the fix); in a call, for ``update_stats=True``
            without a mutable collection, or a variable of more than two dimensions with
            ``error_on_non_matrix=True``.

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
        problems = spectral_norm.problems(self)
        if not (isinstance(self.collection_name, str) and self.collection_name):
            problems.append(
                "collection_name must be a non-empty string naming the collection of u and "
                f"sigma, got {self.collection_name!r}. The default is 'batch_stats'."
            )
        return problems

    # Keyword-only parameters of transform are the wrapper's call options, by design.
    def transform(self, leaf: Leaf, *, update_stats: bool) -> jax.Array:  # type: ignore[override]
        value = jnp.asarray(leaf.value)
        if not spectral_norm.normalises(value, self.n_steps):
            return value
        spectral_norm.check_matrix(
            _describe(self), leaf.path, value.shape, self.error_on_non_matrix
        )
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
        u_shape = (1, value.shape[-1])
        u_dtype = spectral_norm.u_dtype(value, self.param_dtype)
        u_var = self.variable(col, u_name, jax.random.normal, key, u_shape, u_dtype)
        sigma_var = self.variable(col, sigma_name, jnp.ones, (), self.param_dtype)
        normalised, u, sigma = spectral_norm.normalized(
            value, u_var.value, self.n_steps, self.epsilon, self.dtype
        )
        if update_stats:
            u_var.value, sigma_var.value = u, sigma
        return normalised

    def invert(self, leaf: Leaf) -> Inverse:
        # W / sigma(W) has largest singular value 1, so only such a W is reproduced (see
        # the caveat); W is kept as it is, with the u and sigma that power iteration
        # converges to.
        value = jnp.asarray(leaf.value)
        if not spectral_norm.normalises(value, self.n_steps):
            return Inverse(value)
        u, sigma = spectral_norm.fixed_point(value)
        stats = {f"{leaf.path}/u": u, f"{leaf.path}/sigma": sigma}
        return Inverse(
            value,
            {self.collection_name: stats},
            caveat=f"{_describe(self)} divides the weight by its largest singular value "
            "(the norm ratio is 1 / sigma), so it reproduces only weights whose largest "
            "singular value is 1.",
        )
