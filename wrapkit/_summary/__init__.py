"""The summary: capture module calls in one abstract trace, count, render.

Data flows one way: a front end (``capture_linen``, ``capture_nnx``: record calls, locate
variables) -> ``engine`` (trace, markers, rows, attribution) -> ``wrapkit.flops`` (counts)
-> ``data`` (``Summary``, plain data) -> ``render`` / ``tabulate`` / ``cli``.
"""
