"""The summary engine: capture module calls in one abstract trace, count, render.

Data flows one way: ``capture_linen`` (calls and programs) -> ``wrapkit.flops`` (counts)
-> ``data`` (``Summary``, plain data) -> ``render`` / ``tabulate`` / ``cli``.
"""
