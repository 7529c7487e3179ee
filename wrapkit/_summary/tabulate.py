"""``wrapkit.tabulate``: flax's ``nn.tabulate``, rendered from one ``wrapkit.summary`` trace."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import flax.linen as nn
from flax.core.scope import CollectionFilter, DenyList

from .capture_linen import summary
from .data import Summary
from .render import CALL_COLUMNS, rich_table

# flax's default: Module.init makes every collection but "intermediates" mutable.
_ALL_BUT_INTERMEDIATES = DenyList("intermediates")


def tabulate(
    module: nn.Module,
    rngs: Any,
    depth: int | None = None,
    show_repeated: bool = False,
    mutable: CollectionFilter = _ALL_BUT_INTERMEDIATES,
    console_kwargs: Mapping[str, Any] | None = None,
    table_kwargs: Mapping[str, Any] = MappingProxyType({}),
    column_kwargs: Mapping[str, Any] = MappingProxyType({}),
    compute_flops: bool = False,
    compute_vjp_flops: bool = False,
    **kwargs: Any,
) -> Callable[..., str]:
    """A drop-in for ``flax.linen.tabulate``: same arguments, same table, counted FLOPs.

    Moving over is one import change. The returned function takes the forward pass's
    arguments and returns the table as a string, rendered by a ``rich.console.Console``.
    Under the hood it is [`wrapkit.summary`][wrapkit.summary] and
    [`Summary.to_rich`][wrapkit.Summary.to_rich]; call those to get the data instead.

    Differences from flax:

    - One abstract trace per call of the returned function: flax lowers and compiles every
      module call separately to count its FLOPs. Inputs may be ``jax.ShapeDtypeStruct``s.
    - FLOPs are counted from the program, so a call's FLOPs include its callees and every
      call is counted: a repeated call (a tied embedding's ``attend``) is in its caller's
      total even when its row is hidden, and the body of ``nn.scan`` counts ``length``
      times. A call that issues nothing itself shows its total with ``(own 0)``.
    - VJP FLOPs are the call's share of the whole model's VJP, not the VJP of the call on
      its own; flax's ``0`` for non-differentiable calls is simply their share.
    - Rows come in call order (flax sorts them by variable path); ``depth`` counts calls
      (a wrapped module is one level below its wrapper).
    - The footer also totals the FLOPs; the caption has a legend of the numbers and says
      when the FLOPs are a lower bound (primitives without a FLOP rule, a ``while`` loop
      counted once).
    - The table fits the console's width: text wraps, then numbers take short units
      (``6.9M``), then the inputs and outputs columns go; numbers are never cut.
    - With ``compute_flops``, a model that draws random bits (dropout) gets an
      ``RNG bits`` column.

    Args:
        module: the module to tabulate.
        rngs: PRNG keys for the variable collections, as passed to ``Module.init``.
        depth: how many calls deep to show; a row at the limit shows the variables of
            the calls under it. ``None`` shows every call.
        show_repeated: show calls of a module that was called before.
        mutable: collections the call may update, as in ``Module.init``: by default all
            but ``intermediates``.
        console_kwargs: passed to ``rich.console.Console`` (``{"width": 120}`` ...), over
            the defaults ``{"force_terminal": True, "force_jupyter": False}``. The table is
            fitted to the console's width without cutting a number.
        table_kwargs: passed to ``rich.table.Table``.
        column_kwargs: passed to ``rich.table.Table.add_column`` for every column.
        compute_flops: add a ``flops`` column: forward FLOPs of each call.
        compute_vjp_flops: add a ``vjp_flops`` column: each call's share of the VJP.
        **kwargs: passed on as to ``Module.init``: ``method=`` selects the method, any other
            keyword goes to the method itself. ``capture_intermediates`` is accepted and
            ignored, as it does not change the table.

    Returns:
        A function of the forward pass's ``*args, **kwargs`` that returns the table.

    Examples:
        >>> import flax.linen as nn, jax, jax.numpy as jnp, wrapkit
        >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
        >>> x = jax.ShapeDtypeStruct((16, 9), jnp.float32)
        >>> console_kwargs = {"width": 90, "force_terminal": False}  # plain text, for the docs
        >>> tabulate_fn = wrapkit.tabulate(
        ...     model, jax.random.key(0), compute_flops=True, console_kwargs=console_kwargs
        ... )
        >>> print(tabulate_fn(x))
                                          Sequential Summary
        ┏━━━━━━━━━━┳━━━━━━━━━━━━┳━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━┓
        ┃ path     ┃ module     ┃ inputs        ┃ outputs       ┃          flops ┃     params ┃
        ┡━━━━━━━━━━╇━━━━━━━━━━━━╇━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━┩
        │          │ Sequential │ float32[16,9] │ float32[16,2] │ 1,568 (own 64) │            │
        ├──────────┼────────────┼───────────────┼───────────────┼────────────────┼────────────┤
        │ layers_0 │   Dense    │ float32[16,9] │ float32[16,4] │          1,216 │ 40 (160 B) │
        ├──────────┼────────────┼───────────────┼───────────────┼────────────────┼────────────┤
        │ layers_2 │   Dense    │ float32[16,4] │ float32[16,2] │            288 │  10 (40 B) │
        ├──────────┼────────────┼───────────────┼───────────────┼────────────────┼────────────┤
        │          │            │               │         Total │          1,568 │ 50 (200 B) │
        └──────────┴────────────┴───────────────┴───────────────┴────────────────┴────────────┘
        <BLANKLINE>
                                     Total Parameters: 50 (200 B)
                        flops: total with callees (own); params: count (bytes)
        <BLANKLINE>

        The ``(own 64)`` is the ``relu``, which runs in ``Sequential`` itself.
    """
    kwargs = dict(kwargs)
    kwargs.pop("capture_intermediates", None)
    console_options = {"force_terminal": True, "force_jupyter": False, **(console_kwargs or {})}
    table_options = dict(table_kwargs)

    def tabulate_fn(*fn_args: Any, **fn_kwargs: Any) -> str:
        result = summary(
            module,
            *fn_args,
            rngs=rngs,
            mutable=mutable,
            vjp=compute_vjp_flops,
            **fn_kwargs,
            **kwargs,
        )
        import rich.console

        buffer = io.StringIO()
        console = rich.console.Console(file=buffer, **console_options)
        table = rich_table(
            result,
            depth,
            show_repeated=show_repeated,
            columns=_columns(result, compute_flops, compute_vjp_flops),
            column_kwargs=column_kwargs,
            # The console's width, or the table's own width when table_kwargs fixes one.
            width=table_options.pop("width", console.width),
            **table_options,
        )
        console.print(table)
        return "\n" + buffer.getvalue() + "\n"

    return tabulate_fn


def _columns(result: Summary, compute_flops: bool, compute_vjp_flops: bool) -> list[str]:
    """flax's columns, and the random bits next to the FLOPs when the model draws any."""
    shown = {
        "flops": compute_flops,
        "vjp_flops": compute_vjp_flops,
        "rng_bits": compute_flops and bool(result.rng_bits),
    }
    return [column for column in CALL_COLUMNS if shown.get(column, True)]
