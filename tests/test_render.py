"""Rendering summaries: the rich table, the markdown table, and wrapkit.tabulate against flax's."""

import dataclasses
import inspect
import io
import pathlib
import re
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
from wrapkit._summary.render import _bytes_text, markdown, rich_table
from wrapkit._summary.tabulate import tabulate
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
    assert plain(rich_table(summary).caption) == "\nTotal Parameters: 120 (480 B)"


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
    assert len(shown) == 3
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
