"""Count the FLOPs of a JAX program from its jaxpr, the way XLA counts them.

Conventions (see the "Counting FLOPs" page for the reasons):

- One multiply-add is 2 FLOPs; transcendentals (exp, log, tanh, sqrt, ...) are counted apart.
- A loop-free program's total equals XLA's lowered cost analysis,
  ``jax.jit(f).lower(*args).cost_analysis()["flops"]`` (not the compiled one); convolutions
  count only the kernel taps that read real (unpadded) input, as XLA does.
- FLOPs mean what papers mean: random bit generation (``jax.random``'s bits, key splits and
  fold-ins, whatever the key implementation) costs no FLOPs and is reported as ``rng_bits``,
  the number of random bits produced. (XLA counts threefry's hash as integer FLOPs.)
- ``scan``: body x length. ``while``: counted once, flagged ``lower_bound``. ``cond``: the most
  expensive branch, counted in ``branches``. Calls (``jit``, ``custom_jvp``, ``custom_vjp``,
  ``checkpoint``) are recursed into.
- A primitive with no rule counts as nothing, is listed in ``unsupported`` and warned about.
  Add rules per call (``count(..., rules=...)``) or globally (``register_rule``).
"""

from ._count import FlopCount as FlopCount
from ._count import UnsupportedPrimitiveWarning as UnsupportedPrimitiveWarning
from ._count import count as count
from ._count import count_jaxpr as count_jaxpr
from ._rules import ZERO_COST as ZERO_COST
from ._rules import Cost as Cost
from ._rules import FlopRule as FlopRule
from ._rules import elementwise as elementwise
from ._rules import reduction as reduction
from ._rules import register_rule as register_rule
