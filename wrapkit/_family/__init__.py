"""Framework-neutral parts of each wrapper, shared by its Linen and NNX classes.

One module per wrapper: the checks of its options (as functions of any object holding
them), the axes it works over, and its per-variable computation on plain arrays. The
maths itself is in ``_numerics``; the classes in ``linen/`` and ``nnx/`` only add where
their variables live.
"""
