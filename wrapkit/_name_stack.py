"""The jaxpr name stack: read and set in this one place (``jax.extend.source_info_util``).

Linen records each module call in the name stack (``Top/mlp/fc1``); jaxpr equations carry the
stack they were traced under, relative to their enclosing jaxpr. A wrapper runs its
transform under the name stack of its own call, so that tools attribute the transform's
operations to the wrapper, wherever in the stack it runs.
"""

from jax.extend.source_info_util import NameStack as NameStack
from jax.extend.source_info_util import current_name_stack as current_name_stack
from jax.extend.source_info_util import extend_name_stack as extend_name_stack
from jax.extend.source_info_util import set_name_stack as set_name_stack
