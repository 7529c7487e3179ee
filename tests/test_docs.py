"""The docs stay true: every public name has a page, and every code block runs."""

import pathlib
import re
import runpy
import shlex
import types

import pytest

import wrapkit
import wrapkit.flops
import wrapkit.linen
from wrapkit._summary.cli import main as wrapkit_main

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CODE_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def public_names(module: types.ModuleType) -> list[str]:
    return [
        f"{module.__name__}.{name}"
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    ]


@pytest.mark.parametrize(
    "name", public_names(wrapkit) + public_names(wrapkit.linen) + public_names(wrapkit.flops)
)
def test_every_public_name_has_an_api_page(name):
    api = "\n".join(page.read_text() for page in (DOCS / "api").glob("*.md"))
    assert f"::: {name}\n" in api


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {str(page.relative_to(DOCS)) for page in DOCS.rglob("*.md")}
    assert {page for page in pages if page not in nav} == set()


@pytest.mark.parametrize(
    "page",
    sorted(
        page
        for page in [*DOCS.rglob("*.md"), ROOT / "README.md"]
        if CODE_BLOCK.search(page.read_text())
    ),
    ids=lambda page: str(page.relative_to(ROOT)),
)
def test_code_blocks_run(page):
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for block in CODE_BLOCK.findall(page.read_text()):
        exec(compile(block, str(page), "exec"), namespace)


def readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.DOTALL)
    assert first_block is not None, "the README starts with a bash block of commands"
    assert readme.index("```bash") < readme.index("\n## "), "the commands come first"
    return [line for line in first_block.group(1).splitlines() if line and line[0] != "#"]


def test_readme_starts_with_the_main_job_and_the_test_command():
    main_job, tests = readme_commands()
    assert "python -m wrapkit summary examples.wrap_model:resnet" in main_job
    assert "pytest" in tests and ".[test]" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert (
        "readme_command 2" in ci
        and "mkdocs build --strict" in ci
        and "ruff check" in ci
        and "mypy" in ci
    )


def test_main_job_summarises_the_wrapped_example(capsys, monkeypatch):
    main_job, _ = readme_commands()
    argv = shlex.split(main_job.split("python -m wrapkit ", 1)[1])
    monkeypatch.chdir(ROOT)
    assert wrapkit_main(argv) == 0
    printed = capsys.readouterr().out
    assert "ResNet Summary" in printed and "WeightNorm (wraps Conv)" in printed
    assert "SpectralNorm (wraps Dense)" in printed and "layer_forward" not in printed


def test_wrap_model_example_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "wrap_model.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "logits float32[4, 10]" in printed
