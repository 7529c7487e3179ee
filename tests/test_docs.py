"""The docs stay true: every public name has a page, and every code block runs."""

import importlib
import inspect
import pathlib
import pkgutil
import re
import runpy
import shlex
import tomllib
import types
from collections.abc import Iterator

import pytest

import wrapkit
import wrapkit.flops
import wrapkit.linen
import wrapkit.nnx
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
    "name",
    public_names(wrapkit)
    + public_names(wrapkit.linen)
    + public_names(wrapkit.flops)
    + public_names(wrapkit.nnx),
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


def documented_objects() -> Iterator[tuple[str, object]]:
    """Every module, class, function, method and property defined in wrapkit, by name."""
    names = [wrapkit.__name__]
    names += [info.name for info in pkgutil.walk_packages(wrapkit.__path__, "wrapkit.")]
    for module_name in names:
        module = importlib.import_module(module_name)
        yield module_name, module
        for name, value in vars(module).items():
            if inspect.isclass(value) or inspect.isfunction(value):
                if value.__module__ == module_name:
                    yield f"{module_name}.{name}", value
            if inspect.isclass(value) and value.__module__ == module_name:
                for member_name, member in vars(value).items():
                    if isinstance(member, property | classmethod | staticmethod):
                        member = member.fget if isinstance(member, property) else member.__func__
                    if inspect.isfunction(member) and member.__module__ == module_name:
                        yield f"{module_name}.{name}.{member_name}", member


DOCTESTED = sorted(
    (name, inspect.cleandoc(value.__doc__))
    for name, value in documented_objects()
    if value.__doc__ and ">>>" in value.__doc__
)


def test_docstrings_with_examples_are_found():
    names = [name for name, _ in DOCTESTED]
    assert "wrapkit._protocol.register_wrapper" in names
    assert "wrapkit.linen._wrapper.Wrapper" in names


@pytest.mark.parametrize(("name", "docstring"), DOCTESTED, ids=[name for name, _ in DOCTESTED])
def test_doctests_sit_in_an_examples_section(name, docstring):
    # mkdocstrings' Google parser renders only "Examples:" as code; a singular "Example:"
    # becomes an admonition whose ">>>" lines are shown as prose.
    import griffe

    sections = griffe.Docstring(docstring).parse("google")
    kinds = [section.kind for section in sections]
    assert griffe.DocstringSectionKind.examples in kinds, (
        f"{name}: its doctest is not in an 'Examples:' section (sections: "
        f"{[section.title or section.kind.value for section in sections]}); write 'Examples:'."
    )


def test_a_singular_example_header_is_not_an_examples_section():
    # What the test above relies on: griffe reads "Example:" as an admonition.
    import griffe

    singular = griffe.Docstring("Doubles.\n\nExample:\n    >>> 2 * 2\n    4").parse("google")
    plural = griffe.Docstring("Doubles.\n\nExamples:\n    >>> 2 * 2\n    4").parse("google")
    assert [section.kind.value for section in singular] == ["text", "admonition"]
    assert [section.kind.value for section in plural] == ["text", "examples"]


def test_no_docstring_has_a_singular_example_header():
    singular = [
        name
        for name, value in documented_objects()
        if value.__doc__ and re.search(r"^\s*Example:\s*$", value.__doc__, re.MULTILINE)
    ]
    assert singular == [], "write 'Examples:', which mkdocstrings renders as code"


def test_license_is_the_apache_license_named_in_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = pyproject["project"]["license"]  # a table, or an SPDX string (PEP 639)
    assert (declared if isinstance(declared, str) else declared["text"]) == "Apache-2.0"
    license_text = (ROOT / "LICENSE").read_text()
    first_lines = [line.strip() for line in license_text.splitlines()[:5]]
    assert first_lines[0] == "Copyright 2026 The wrapkit authors"
    assert "Apache License" in first_lines and "Version 2.0, January 2004" in first_lines
    assert "END OF TERMS AND CONDITIONS" in license_text  # the full text, not a stub


def test_changelog_has_an_unreleased_section():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## (.+)$", changelog, re.MULTILINE)
    assert headings[0] == "[Unreleased]"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert any(heading.startswith(f"[{version}]") for heading in headings)


def test_supported_versions_are_stated():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {"python": dependencies["requires-python"]}
    floors |= {
        match.group(1): match.group(2)
        for match in (re.match(r"([a-z]+)(>=.+)", dep) for dep in dependencies["dependencies"])
        if match and match.group(1) in ("flax", "jax", "jaxlib")
    }
    assert floors == {
        "python": ">=3.11",
        "flax": ">=0.12.8",
        "jax": ">=0.10.2",
        "jaxlib": ">=0.10.2",
    }
    for page in (DOCS / "index.md", ROOT / "README.md"):
        text = " ".join(page.read_text().split())
        for claim in ("Python 3.11", "flax 0.12.8", "jax and jaxlib 0.10.2"):
            assert claim in text, f"{page.name} does not state {claim!r}"
