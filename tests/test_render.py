"""Rendering summaries: the rich table, the markdown table, and wrapkit.tabulate against flax's."""

import dataclasses
import inspect
import io
import pathlib
import re
import sys
from types import MappingProxyType
from typing import Any

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import pytest
import rich.console
import rich.table
from flax.linen import summary as flax_summary

import wrapkit
from wrapkit._summary.data import Row, Summary, VariableStats
from wrapkit._summary.render import _bytes_text, _short_text, markdown, rich_table
from wrapkit._summary.tabulate import _columns, tabulate
from wrapkit.flops import Cost

F32 = jnp.float32


# --- hand-built summaries -------------------------------------------------------------------


@dataclasses.dataclass
class Call:
    """A call tree node from which `build` makes consistent rows (totals = own + callees)."""

    path: str
    module_type: str
    own_flops: int = 0
    variables: dict[str, VariableStats] = dataclasses.field(default_factory=dict)
    children: list["Call"] = dataclasses.field(default_factory=list)
    method: str = "__call__"
    repeated: bool = False
    wrapper: bool = False
    inputs: Any = ((jax.ShapeDtypeStruct((8, 3), F32),), {})
    outputs: Any = jax.ShapeDtypeStruct((8, 4), F32)


def build(root: Call, *, vjp: bool = True, **fields: Any) -> Summary:
    rows: list[Row] = []

    def add(call: Call, parent: int | None, depth: int) -> tuple[int, int]:
        index = len(rows)
        rows.append(None)  # type: ignore[arg-type]
        children, total = [], call.own_flops
        for child in call.children:
            child_index, child_total = add(child, index, depth + 1)
            children.append(child_index)
            total += child_total
        rows[index] = Row(
            index=index,
            parent=parent,
            children=tuple(children),
            depth=depth,
            path=tuple(call.path.split("/")) if call.path else (),
            module_type=call.module_type,
            method=call.method,
            inputs=call.inputs,
            outputs=call.outputs,
            variables=MappingProxyType(call.variables),
            repeated=call.repeated,
            wrapper=call.wrapper,
            own_flops=call.own_flops,
            flops=total,
            own_transcendentals=0,
            transcendentals=0,
            own_vjp_flops=3 * call.own_flops if vjp else None,
            vjp_flops=3 * total if vjp else None,
        )
        return index, total

    add(root, None, 0)
    totals: dict[str, VariableStats] = {}
    for row in rows:
        if not row.repeated:
            for name, stats in row.variables.items():
                totals[name] = totals.get(name, VariableStats()) + stats
    defaults: dict[str, Any] = {
        "module_type": root.module_type,
        "rows": tuple(rows),
        "collections": tuple(totals),
        "variables": MappingProxyType(totals),
        "flops": rows[0].flops,
        "transcendentals": 0,
        "vjp_flops": rows[0].vjp_flops,
        "primitives": MappingProxyType({"dot_general": Cost(rows[0].flops, 0)}),
        "vjp_primitives": MappingProxyType({}),
        "unsupported": (),
        "lower_bound": False,
        "branches": 0,
    }
    return Summary(**{**defaults, **fields})


def params(count: int) -> dict[str, VariableStats]:
    return {"params": VariableStats(count, 4 * count)}


def model_summary(**fields: Any) -> Summary:
    """An encoder with a wrapped Dense, a block of two layers, and a shared embedding."""
    return build(
        Call(
            "",
            "Model",
            own_flops=5,
            children=[
                Call("embed", "Embed", variables=params(64)),
                Call(
                    "proj",
                    "WeightNorm",
                    own_flops=8,
                    variables=params(4),
                    wrapper=True,
                    children=[Call("proj/Dense_0", "Dense", own_flops=96, variables=params(16))],
                ),
                Call(
                    "block",
                    "Block",
                    children=[
                        Call(
                            "block/norm",
                            "BatchNorm",
                            own_flops=40,
                            variables={
                                "params": VariableStats(8, 32),
                                "batch_stats": VariableStats(8, 32),
                            },
                        ),
                        Call("block/mlp", "Dense", own_flops=300, variables=params(20)),
                    ],
                ),
                Call("embed", "Embed", own_flops=512, method="attend", repeated=True),
            ],
        ),
        **fields,
    )


def markdown_rows(text: str) -> list[list[str]]:
    """The body of the first markdown table in ``text``, without the header and rule."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line[2:-2].split(" | ")] for line in lines[2:]]


def markdown_header(text: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith("| "))
    return [cell.strip() for cell in line[2:-2].split(" | ")]


def plain(renderable: Any) -> str:
    return renderable.plain if hasattr(renderable, "plain") else str(renderable)


def table_columns(table: rich.table.Table) -> dict[str, list[str]]:
    return {str(column.header): [plain(cell) for cell in column.cells] for column in table.columns}


def table_footer(table: rich.table.Table) -> dict[str, str]:
    return {str(column.header): plain(column.footer) for column in table.columns}


def rendered(table: rich.table.Table) -> str:
    buffer = io.StringIO()
    rich.console.Console(file=buffer, width=250, color_system=None).print(table)
    return buffer.getvalue()


def summed(cells: list[str]) -> int:
    return sum(int(cell.split(" ")[0].replace(",", "")) for cell in cells if cell)


# --- what the tables show -------------------------------------------------------------------


def test_markdown_shows_every_call_in_call_order():
    summary = model_summary()
    rows = markdown_rows(markdown(summary))
    assert [row[0] for row in rows[:-1]] == [r.name for r in summary.rows]
    assert [row[1] for row in rows[:-1]] == [
        "Model",
        "Embed",
        "WeightNorm (wraps Dense)",
        "Dense",
        "Block",
        "BatchNorm",
        "Dense",
        "Embed (attend, repeated)",
    ]
    assert rows[1][2:4] == ["float32[8,3]", "float32[8,4]"]


def test_rich_table_has_flaxs_layout_and_every_call():
    summary = model_summary()
    table = rich_table(summary)
    assert str(table.title) == "Model Summary"
    assert table.show_lines and table.show_footer
    columns = table_columns(table)
    assert list(columns) == [
        "path",
        "module",
        "inputs",
        "outputs",
        "flops",
        "vjp_flops",
        "params",
        "batch_stats",
    ]
    assert columns["path"] == [row.name for row in summary.rows]
    assert columns["module"][-1] == "  Embed (attend, repeated)"  # indented by depth
    text = rendered(table)
    assert "Total Parameters: 120 (480 B)" in text
    assert "proj/Dense_0" in text and "WeightNorm (wraps Dense)" in text


@pytest.mark.parametrize("render", ["markdown", "rich"])
def test_totals_are_the_summarys_totals(render):
    summary = model_summary()
    if render == "markdown":
        text = markdown(summary)
        footer = dict(zip(markdown_header(text), markdown_rows(text)[-1], strict=True))
        footer = {key: value.strip("*") for key, value in footer.items()}
    else:
        footer = table_footer(rich_table(summary))
    assert footer["outputs"] == "Total"
    assert footer["flops"] == f"{summary.flops:,}" == "961"
    assert footer["vjp_flops"] == f"{summary.vjp_flops:,}" == "2,883"
    assert footer["params"] == "112 (448 B)"
    assert footer["batch_stats"] == "8 (32 B)"
    assert summary.variables["params"] == VariableStats(112, 448)


def test_flops_cells_show_the_total_and_own_flops_when_they_differ():
    columns = table_columns(rich_table(model_summary()))
    assert columns["flops"][0] == "961 (own 5)"
    assert columns["flops"][2] == "104 (own 8)"  # the wrapper: its transform, then the Dense
    assert columns["flops"][3] == "96"
    assert columns["vjp_flops"][3] == "288"


def test_variable_cells_read_count_and_bytes_like_flax():
    columns = table_columns(rich_table(model_summary()))
    assert columns["params"][:3] == ["", "64 (256 B)", "4 (16 B)"]
    assert columns["batch_stats"][5] == "8 (32 B)"
    # The repeated call's variables were shown at the first call of its module.
    assert columns["params"][-1] == ""


@pytest.mark.parametrize("render", ["markdown", "rich"])
@pytest.mark.parametrize("depth", [None, 0, 1, 2])
def test_variable_cells_add_up_to_the_totals_at_every_depth(render, depth):
    summary = model_summary()
    if render == "markdown":
        text = markdown(summary, depth)
        columns = dict(
            zip(markdown_header(text), zip(*markdown_rows(text)[:-1], strict=True), strict=True)
        )
    else:
        columns = table_columns(rich_table(summary, depth))
    assert summed(list(columns["params"])) == summary.variables["params"].count
    assert summed(list(columns["batch_stats"])) == summary.variables["batch_stats"].count


def test_depth_cut_hides_deeper_calls_and_shows_their_variables():
    summary = model_summary()
    columns = table_columns(rich_table(summary, 1))
    assert columns["path"] == ["", "embed", "proj", "block", "embed"]
    # proj stands for its wrapped Dense; block for its norm and mlp, in both collections.
    assert columns["params"][2:4] == ["20 (80 B)", "28 (112 B)"]
    assert dict(summary.subtree_variables(summary.find("block")[0])) == {
        "params": VariableStats(28, 112),
        "batch_stats": VariableStats(8, 32),
    }
    assert columns["batch_stats"][3] == "8 (32 B)"
    # FLOPs stay the calls' totals, callees included.
    assert columns["flops"][3] == "340 (own 0)"


def test_depth_zero_is_the_root_with_everything():
    columns = table_columns(rich_table(model_summary(), 0))
    assert columns["path"] == [""]
    assert columns["params"] == ["112 (448 B)"]


@pytest.mark.parametrize("render", ["markdown", "rich"])
def test_show_repeated_false_hides_repeated_calls_whose_flops_stay_counted(render):
    summary = model_summary()
    if render == "markdown":
        modules = [row[1] for row in markdown_rows(markdown(summary, show_repeated=False))]
        flops = [row[4] for row in markdown_rows(markdown(summary, show_repeated=False))]
    else:
        columns = table_columns(rich_table(summary, show_repeated=False))
        modules, flops = columns["module"], columns["flops"]
    assert not any("repeated" in module for module in modules)
    assert len(modules) == len(summary.rows) - 1 + (render == "markdown")
    # The tied embedding's 512 FLOPs are still in the root's total.
    assert flops[0].startswith("961")


def test_vjp_column_only_when_the_summary_has_vjp_flops():
    summary = build(Call("", "Dense", own_flops=10, variables=params(3)), vjp=False)
    assert "vjp_flops" not in table_columns(rich_table(summary))
    assert "vjp_flops" not in markdown_header(markdown(summary))
    assert "vjp_flops" in markdown_header(markdown(model_summary()))


def test_columns_select_the_call_columns():
    table = rich_table(model_summary(), columns=("path", "flops"))
    assert list(table_columns(table)) == ["path", "flops", "params", "batch_stats"]
    # The "Total" label goes to the last text column.
    assert table_footer(table) == {
        "path": "Total",
        "flops": "961",
        "params": "112 (448 B)",
        "batch_stats": "8 (32 B)",
    }


@pytest.mark.parametrize(
    ("fields", "note"),
    [
        (
            {"unsupported": ("custom_thing", "my_prim")},
            "FLOPs are a lower bound: primitives without a FLOP rule were not counted: "
            "custom_thing, my_prim.",
        ),
        ({"lower_bound": True}, "FLOPs are a lower bound: a while loop was counted once."),
        ({"branches": 1}, "1 cond/switch: the most expensive branch was counted."),
        ({"branches": 3}, "3 cond/switch: the most expensive branch of each was counted."),
    ],
    ids=["unsupported", "while", "one-branch", "branches"],
)
def test_notes_say_why_flops_are_not_exact(fields, note):
    summary = model_summary(**fields)
    assert f"\n- {note}\n" in markdown(summary)
    assert note in plain(rich_table(summary).caption).splitlines()
    # Without FLOPs columns, notes about FLOPs would be noise.
    assert note not in markdown(summary, columns=("path", "module"))


def test_no_notes_when_flops_are_exact():
    summary = model_summary()
    assert markdown(summary).endswith("Total Parameters: 120 (480 B)\n")
    assert plain(rich_table(summary).caption) == (
        "\nTotal Parameters: 120 (480 B)\n"
        "flops: total with callees (own); vjp_flops: share of forward + backward (own); "
        "params, batch_stats: count (bytes)"
    )


def test_nested_inputs_and_outputs_read_like_a_call_site():
    x = jax.ShapeDtypeStruct((2, 5), jnp.int32)
    summary = build(
        Call(
            "",
            "Net",
            inputs=((x, (x, 3)), {"train": True, "mask": {"a": x}}),
            outputs=(x, {"logits": jax.ShapeDtypeStruct((2,), jnp.bfloat16)}),
        )
    )
    row = markdown_rows(markdown(summary))[0]
    assert row[2] == "int32[2,5], (int32[2,5], 3), train: True, mask: {a: int32[2,5]}"
    assert row[3] == "int32[2,5], {logits: bfloat16[2]}"


def test_markdown_escapes_pipes():
    summary = build(Call("", "Net", inputs=((), {"how": "a|b"})))
    assert markdown_rows(markdown(summary))[0][2] == "how: a\\|b"


def test_table_kwargs_override_the_defaults_and_column_kwargs_reach_every_column():
    table = rich_table(
        model_summary(),
        title="Mine",
        show_lines=False,
        column_kwargs={"style": "red", "justify": "center"},
    )
    assert table.title == "Mine" and not table.show_lines
    assert {(column.style, column.justify) for column in table.columns} == {("red", "center")}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"depth": -1}, ValueError, r"depth=-1 is negative\. Pass depth=0 for the root"),
        ({"columns": ("path", "shapes")}, ValueError, r"Unknown columns \['shapes'\]\. Choose"),
        ({"columns": "path"}, TypeError, r"columns='path' is a string\. Pass a sequence"),
    ],
    ids=["negative-depth", "unknown-column", "string-columns"],
)
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        markdown(model_summary(), **kwargs)
    with pytest.raises(error, match=match):
        rich_table(model_summary(), **kwargs)


def test_vjp_column_without_vjp_flops_says_how_to_get_them():
    summary = build(Call("", "Dense"), vjp=False)
    with pytest.raises(ValueError, match=r"Make it with wrapkit\.summary\(\.\.\., vjp=True\)"):
        rich_table(summary, columns=("vjp_flops",))


def test_str_of_a_summary_is_its_markdown():
    summary = model_summary()
    assert str(summary) == markdown(summary) == summary.to_markdown()
    assert table_columns(summary.to_rich(1, title="t")) == table_columns(rich_table(summary, 1))


@hypothesis.given(st.integers(min_value=0, max_value=10**13))
def test_bytes_read_like_flaxs(count):
    assert _bytes_text(count) == flax_summary._bytes_repr(count)


# --- real summaries -------------------------------------------------------------------------


class Tied(nn.Module):
    """A small model with a wrapper, a depth of three and a repeated (tied) call."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(32, 8, name="embed")
        x = embed(tokens)
        x = wrapkit.linen.WeightNorm(nn.Dense(8), name="proj")(x)
        x = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(8)], name="mlp")(x)
        return embed.attend(nn.LayerNorm(name="norm")(x))


TOKENS = jax.ShapeDtypeStruct((2, 5), jnp.int32)


@pytest.fixture(scope="module")
def tied() -> Summary:
    return wrapkit.summary(Tied(), TOKENS, vjp=True)


def test_real_summary_renders_every_row(tied):
    rows = markdown_rows(markdown(tied))
    assert [row[0] for row in rows[:-1]] == [row.name for row in tied.rows]
    assert rows[-1][4].strip("*") == f"{tied.flops:,}"
    assert rows[-1][5].strip("*") == f"{tied.vjp_flops:,}"
    assert any("WeightNorm (wraps Dense)" in row[1] for row in rows)
    assert rows[-2][1] == "Embed (attend, repeated)"


@pytest.mark.parametrize("depth", [None, 0, 1, 2])
def test_real_summary_cells_add_up_at_every_depth(tied, depth):
    columns = table_columns(rich_table(tied, depth))
    assert summed(columns["params"]) == tied.variables["params"].count
    assert max(row.depth for row in tied.rows) >= 2


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(nn.relu(x))


class Codec(nn.Module):
    def setup(self):
        self.encoder = nn.Dense(16)
        self.decoder = nn.Dense(9)

    def __call__(self, x):
        return self.decoder(self.encode(x))

    def encode(self, x):
        return self.encoder(x)


def column_by_path(text: str, name: str) -> dict[str, int]:
    """A numeric column of a rendered table, by path, from each row's first line."""
    lines = strip_ansi(text).splitlines()
    header = next(line for line in lines if "path" in line)
    names = [cell.strip() for cell in header.split("┃")]
    found = {}
    for line in lines:
        cells = dict(zip(names, (cell.strip() for cell in line.split("│")), strict=False))
        if line.startswith("│") and cells["module"]:
            found[cells["path"]] = int(cells[name].split(" ")[0].replace(",", ""))
    return found


def caption(text: str) -> str:
    return next(
        line.strip() for line in strip_ansi(text).splitlines() if "Total Parameters" in line
    )


def test_tabulate_is_a_drop_in_for_flaxs_with_the_same_totals():
    x = jnp.ones((4, 9))
    keys = {"params": jax.random.key(0)}
    options = {"compute_flops": True, "compute_vjp_flops": True, "console_kwargs": {"width": 200}}
    ours = tabulate(Mlp(), keys, **options)(x, train=True)
    theirs = nn.tabulate(Mlp(), keys, **options)(x, train=True)
    assert "\x1b[" in ours  # a terminal's table by default, as flax's
    assert caption(ours) == caption(theirs) == "Total Parameters: 275 (1.1 KB)"
    header = next(line for line in strip_ansi(ours).splitlines() if "path" in line)
    names = re.findall(r"\w+", header)
    assert names[:6] == ["path", "module", "inputs", "outputs", "flops", "vjp_flops"]
    assert sorted(names[6:]) == ["batch_stats", "params"]
    # Per call, the forward FLOPs are flax's compiled counts (no repeated calls here).
    assert column_by_path(ours, "flops") == column_by_path(theirs, "flops")
    assert column_by_path(ours, "flops") == {
        "": 2236,
        "Dense_0": 1216,
        "BatchNorm_0": 560,
        "Dense_1": 396,
    }


def test_tabulate_shows_flops_columns_only_when_asked():
    x = jax.ShapeDtypeStruct((4, 9), F32)
    console = {"console_kwargs": {"force_terminal": False, "width": 200}}
    header = next(
        line
        for line in tabulate(Mlp(), jax.random.key(0), **console)(x).splitlines()
        if "path" in line
    )
    assert "flops" not in header
    header = next(
        line
        for line in tabulate(Mlp(), jax.random.key(0), compute_vjp_flops=True, **console)(
            x
        ).splitlines()
        if "path" in line
    )
    assert re.findall(r"\w+", header)[4] == "vjp_flops"


def test_tabulate_passes_its_options_on():
    x = jax.ShapeDtypeStruct((4, 9), F32)
    text = tabulate(
        Mlp(),
        jax.random.key(0),
        depth=0,
        console_kwargs={"force_terminal": False, "width": 200},
        table_kwargs={"title": "My MLP"},
        column_kwargs={"justify": "center"},
        compute_flops=True,
    )(x)
    assert "\x1b[" not in text  # console_kwargs: no terminal codes
    assert "My MLP" in text and "Dense_0" not in text  # table_kwargs, depth
    assert max(len(line) for line in text.splitlines()) > 80  # the console's width
    header = next(line for line in text.splitlines() if "path" in line)
    assert re.search(r"┃  +inputs  +┃", header), header  # column_kwargs: centred


def test_tabulate_show_repeated_like_flax():
    options = {"console_kwargs": {"force_terminal": False, "width": 200}}
    hidden = tabulate(Tied(), jax.random.key(0), **options)(TOKENS)
    shown = tabulate(Tied(), jax.random.key(0), show_repeated=True, **options)(TOKENS)
    assert "attend" not in hidden and "Embed (attend, repeated)" in shown
    assert (
        caption(hidden)
        == caption(shown)
        == caption(nn.tabulate(Tied(), jax.random.key(0), **options)(TOKENS))
    )


def test_tabulate_passes_method_and_keywords_like_flax():
    x = jnp.ones((4, 9))
    keys = jax.random.key(0)
    ours = tabulate(Codec(), keys, method="encode")(x)
    assert caption(ours) == caption(nn.tabulate(Codec(), keys, method="encode")(x))
    assert caption(ours) == "Total Parameters: 160 (640 B)"
    ours = tabulate(Mlp(), keys, train=True)(x)
    assert caption(ours) == caption(nn.tabulate(Mlp(), keys, train=True)(x))


DOCS_PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "summary-output.md"


def test_the_docs_page_shows_what_its_code_prints(capsys):
    page = DOCS_PAGE.read_text()
    namespace: dict[str, Any] = {"__name__": "docs_summary_output"}
    for block in re.findall(r"^```python\n(.*?)^```", page, re.DOTALL | re.MULTILINE):
        exec(compile(block, str(DOCS_PAGE), "exec"), namespace)
    printed = capsys.readouterr().out
    shown = re.findall(r"^```text\n(.*?)^```", page, re.DOTALL | re.MULTILINE)
    assert len(shown) == 4
    for block in shown:
        assert block in printed


def test_tabulate_takes_flaxs_parameters_in_flaxs_order_with_flaxs_defaults():
    ours = inspect.signature(wrapkit.tabulate).parameters
    theirs = inspect.signature(nn.tabulate).parameters
    assert list(ours) == list(theirs)
    assert [(p.kind, p.default) for p in ours.values()] == [
        (p.kind, p.default) for p in theirs.values()
    ]


def test_a_summary_shows_itself_in_a_repl_in_rich_and_in_notebooks():
    summary = wrapkit.summary(
        nn.Sequential([nn.Dense(3), nn.Dense(2)]), jax.ShapeDtypeStruct((2, 4), jnp.float32)
    )
    assert repr(summary) == f"Summary(Sequential, 3 calls, flops={summary.flops:,})"
    console = rich.console.Console(file=io.StringIO(), width=200)
    console.print(summary)
    assert "Sequential Summary" in console.file.getvalue()
    assert summary._repr_markdown_() == summary.to_markdown() == str(summary)
    single = wrapkit.summary(nn.Dense(3), jax.ShapeDtypeStruct((2, 4), jnp.float32), vjp=True)
    flops = 2 * 2 * 4 * 3 + 2 * 3  # matmul and bias
    assert repr(single) == f"Summary(Dense, 1 call, flops={flops}, vjp_flops={single.vjp_flops})"


# --- fitting a width ------------------------------------------------------------------------

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The examples are a folder of scripts, not an installed package.
sys.path.insert(0, str(ROOT))

from examples import gpt2, wrap_model  # noqa: E402

UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
BYTE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}


@pytest.fixture(scope="module")
def gpt2_small() -> Summary:
    return wrapkit.summary(gpt2.gpt2_small(), jax.ShapeDtypeStruct((1, 128), jnp.int32), vjp=True)


@pytest.fixture(scope="module")
def resnet() -> Summary:
    return wrapkit.summary(wrap_model.resnet(), jax.ShapeDtypeStruct((8, 32, 32, 3), F32), vjp=True)


def printed(table: Any, width: int) -> str:
    console = rich.console.Console(width=width, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def parse_table(text: str) -> tuple[list[str], list[dict[str, str]]]:
    """The headers and, per row (the footer last), each column's lines joined."""

    def split(line: str, bar: str) -> list[str]:
        return [cell.strip() for cell in line.split(bar)[1:-1]]

    lines = text.splitlines()
    heads = [split(line, "┃") for line in lines if line.startswith("┃")]
    headers = [" ".join(part for part in parts if part) for parts in zip(*heads, strict=True)]
    rows, block = [], []
    for line in lines:
        if line.startswith("│"):
            block.append(split(line, "│"))
        elif block:
            joined = {}
            for header, parts in zip(headers, zip(*block, strict=True), strict=True):
                glue = "" if header == "path" else " "  # a path wraps after a "/"
                joined[header] = glue.join(part for part in parts if part)
            rows.append(joined)
            block = []
    return headers, rows


def assert_reads_as(text: str, exact: int) -> None:
    """``text`` is ``exact``, written exactly or to within its unit's rounding."""
    match = re.fullmatch(r"([\d,]+(?:\.\d)?)([KMGT]?)", text)
    assert match, text
    number, unit = float(match[1].replace(",", "")), UNITS[match[2]]
    if unit == 1:
        assert number == exact, text
    else:
        assert abs(number * unit - exact) <= 0.05 * unit, (text, exact)


def assert_count_cell(cell: str, count: int | None, second: int | None, nbytes: bool) -> None:
    if count is None:
        assert cell == ""
        return
    pattern = r"(\S+)(?: \((?:own )?(\S+?)( ?[KMG]?B)?\))?"
    match = re.fullmatch(pattern, cell)
    assert match, cell
    assert_reads_as(match[1], count)
    if second is None:
        assert match[2] is None, cell
    elif nbytes:
        scale = BYTE_UNITS[match[3].strip()]
        assert abs(float(match[2].replace(",", "")) * scale - second) <= 0.05 * scale, cell
    else:
        assert_reads_as(match[2], second)


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("model", ["gpt2_small", "resnet"])
def test_tables_fit_the_width_without_cutting_a_number(request, model, width):
    summary = request.getfixturevalue(model)
    text = printed(rich_table(summary, width=width), width)
    assert max(len(line) for line in text.splitlines()) <= width
    assert "…" not in text
    headers, rows = parse_table(text)
    assert {"path", "flops", "vjp_flops", "params"} <= set(headers)
    assert len(rows) == len(summary.rows) + 1
    for row, shown in zip(summary.rows, rows, strict=False):
        assert shown["path"] == row.name
        own = None if row.own_flops == row.flops else row.own_flops
        assert_count_cell(shown["flops"], row.flops, own, nbytes=False)
        own_vjp = None if row.own_vjp_flops == row.vjp_flops else row.own_vjp_flops
        assert_count_cell(shown["vjp_flops"], row.vjp_flops, own_vjp, nbytes=False)
        for name in summary.collections:
            stats = None if row.repeated else row.variables.get(name)
            assert_count_cell(
                shown[name],
                stats.count if stats else None,
                stats.bytes if stats else None,
                nbytes=True,
            )
    footer = rows[-1]
    assert_count_cell(footer["flops"], summary.flops, None, nbytes=False)
    assert_count_cell(footer["vjp_flops"], summary.vjp_flops, None, nbytes=False)
    params = summary.variables["params"]
    assert_count_cell(footer["params"], params.count, params.bytes, nbytes=True)
    assert "flops: total with callees (own); vjp_flops: share of forward + backward (own)" in (
        " ".join(text.split())
    )


def test_a_table_that_fits_is_the_natural_table(tied):
    natural = printed(rich_table(tied), 250)
    assert printed(rich_table(tied, width=250), 250) == natural
    assert "K, M, G, T" not in natural  # exact numbers: no units to explain


def test_narrow_tables_use_short_units_and_say_so(gpt2_small):
    text = printed(rich_table(gpt2_small, width=80), 80)
    # Exact numbers where they fit, short units where they do not.
    assert "32,310,947,840" in text  # the forward FLOPs
    assert re.search(r"\b96\.9G\b", text)  # the VJP's, 96,935,918,464
    assert "K, M, G, T: 10^3, 10^6, 10^9, 10^12" in " ".join(text.split())


def test_shapes_are_dropped_before_numbers_inputs_first(resnet):
    widths = {}
    for width in range(200, 60, -5):
        headers, _ = parse_table(printed(rich_table(resnet, width=width), width))
        widths[width] = headers
    with_outputs_only = [w for w, h in widths.items() if "outputs" in h and "inputs" not in h]
    assert with_outputs_only, widths  # the inputs go first
    assert all("inputs" in widths[w] for w in widths if w > max(with_outputs_only))
    assert all({"flops", "vjp_flops", "params"} <= set(h) for h in widths.values())


def test_a_long_path_wraps_after_a_slash(resnet):
    table = rich_table(resnet, width=80)
    paths = [plain(cell) for cell in table.columns[0].cells]
    assert any("/\n" in path for path in paths)
    assert [path.replace("\n", "") for path in paths] == [row.name for row in resnet.rows]


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0"),
        (999, "999"),
        (1000, "1.0K"),
        (73_058_304, "73.1M"),
        (73_058, "73.1K"),
        (999_960, "1.0M"),
        (6_918_848, "6.9M"),
        (1_234_567_890, "1.2G"),
        (5 * 10**15, "5,000.0T"),
    ],
)
def test_short_numbers(count, text):
    assert _short_text(count) == text


@hypothesis.given(st.integers(min_value=0, max_value=10**15))
def test_short_numbers_read_back_within_their_rounding(count):
    assert_reads_as(_short_text(count), count)


@pytest.mark.parametrize(
    ("width", "error", "match"),
    [
        (0, ValueError, r"width=0 is not positive\. Pass the number of terminal columns"),
        (-3, ValueError, r"width=-3 is not positive"),
        ("80", TypeError, r"width='80' is not an integer\. Pass the number of terminal columns"),
        (True, TypeError, r"width=True is not an integer"),
    ],
    ids=["zero", "negative", "string", "bool"],
)
def test_bad_widths_are_named(width, error, match):
    with pytest.raises(error, match=match):
        rich_table(model_summary(), width=width)


def test_tabulate_fits_the_consoles_width(resnet):
    text = tabulate(
        wrap_model.resnet(),
        jax.random.key(0),
        compute_flops=True,
        compute_vjp_flops=True,
        console_kwargs={"width": 80, "force_terminal": False},
    )(jax.ShapeDtypeStruct((8, 32, 32, 3), F32))
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    total = sum(resnet.variables.values(), VariableStats())
    assert f"Total Parameters: {total.count:,} ({_bytes_text(total.bytes)})" in text


# --- random bits ----------------------------------------------------------------------------


def with_rng_bits(summary: Summary) -> Summary:
    """``summary`` as if its Dense layers each drew 1,000 random bits (a dropout mask)."""
    own = [1000 if row.module_type == "Dense" else 0 for row in summary.rows]
    totals = list(own)
    for row in reversed(summary.rows):
        if row.parent is not None:
            totals[row.parent] += totals[row.index]
    rows = tuple(
        dataclasses.replace(row, own_rng_bits=own[row.index], rng_bits=totals[row.index])
        for row in summary.rows
    )
    return dataclasses.replace(summary, rows=rows, rng_bits=totals[0])


def test_rng_bits_column_only_when_the_model_draws_random_bits(tied):
    assert "RNG bits" not in table_columns(rich_table(tied))
    assert "RNG bits" not in markdown_header(markdown(tied))
    drawing = with_rng_bits(tied)
    assert drawing.rng_bits == 3000  # proj's Dense and the two of mlp
    columns = table_columns(rich_table(drawing))
    assert list(columns)[:7] == [
        "path",
        "module",
        "inputs",
        "outputs",
        "flops",
        "vjp_flops",
        "RNG bits",
    ]
    by_type = dict(zip(columns["module"], columns["RNG bits"], strict=True))
    assert columns["RNG bits"][0] == "3,000 (own 0)"
    assert by_type["  Sequential"] == "2,000 (own 0)" and by_type["    Dense"] == "1,000"
    assert table_footer(rich_table(drawing))["RNG bits"] == "3,000"
    assert "RNG bits: random bits drawn (own)" in plain(rich_table(drawing).caption)
    text = markdown(drawing)
    header = markdown_header(text)
    assert header[6] == "RNG bits"
    assert markdown_rows(text)[-1][6] == "**3,000**"
    assert [row[6] for row in markdown_rows(text)[:-1]] == list(columns["RNG bits"])


def test_rng_bits_can_be_asked_for_and_fit_a_width(tied):
    columns = table_columns(rich_table(tied, columns=("path", "rng_bits")))
    assert columns["RNG bits"][0] == "0"
    text = printed(rich_table(with_rng_bits(tied), width=80), 80)
    assert max(len(line) for line in text.splitlines()) <= 80
    headers, rows = parse_table(text)
    assert "RNG bits" in headers and rows[-1]["RNG bits"] == "3,000"


def test_tabulate_shows_rng_bits_next_to_the_flops(tied):
    drawing = with_rng_bits(tied)
    assert "rng_bits" in _columns(drawing, compute_flops=True, compute_vjp_flops=False)
    assert "rng_bits" not in _columns(drawing, compute_flops=False, compute_vjp_flops=False)
    assert "rng_bits" not in _columns(tied, compute_flops=True, compute_vjp_flops=True)


@pytest.mark.parametrize("width", [80, 120])
def test_printing_a_summary_fits_the_console(gpt2_small: Summary, width: int) -> None:
    """``rich.print(summary)`` fits the table to the console, as ``to_rich(width=)`` does."""
    text = printed(gpt2_small, width)
    assert all(len(line) <= width for line in text.splitlines())
    assert "…" not in text
    assert text == printed(gpt2_small.to_rich(width=width), width)
