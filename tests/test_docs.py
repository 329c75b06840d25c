"""The README and docs/*.md examples run as written; docstring examples pass.

Every fenced block whose language is ``python`` in README.md and docs/*.md runs, the
blocks of one page in order in one namespace (a page reads top to bottom). A block
that needs data or a long time starts with the marker line ``# not run: <reason>``:
it is compiled (so it stays valid Python) but not run. Blocks in other languages
(``bash``, ``text``, ...) are not run.
"""

import doctest
import importlib
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"#\s*not run:\s*\S")
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<info>[^`\n]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
    re.MULTILINE | re.DOTALL,
)
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")

CORE_MODULES = [
    "sgdjax._alias", "sgdjax._averaging", "sgdjax._clipping", "sgdjax._combine",
    "sgdjax._decay", "sgdjax._diagnostics", "sgdjax._flatten", "sgdjax._lars",
    "sgdjax._lookahead", "sgdjax._momentum", "sgdjax._scale", "sgdjax._schedule_free",
    "sgdjax._skip", "sgdjax.schedules", "sgdjax.parallel._mesh",
]  # fmt: skip


def code_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block, the code dedented to its fence."""
    blocks = []
    for match in FENCE.finditer(text):
        language = match["info"].strip().split(" ")[0].lower()
        blocks.append((language, textwrap.dedent(match["body"])))
    return blocks


def python_blocks(text: str) -> list[tuple[str, bool]]:
    """``(code, runs)`` of every ``python`` block; ``runs`` is False for marked blocks."""
    return [
        (code, not NOT_RUN.match(code.lstrip()))
        for language, code in code_blocks(text)
        if language == "python"
    ]


def run_page(text: str, name: str) -> int:
    """Compiles every python block of a page and runs the unmarked ones in order in one
    namespace; returns how many ran."""
    namespace = {"__name__": f"docs:{name}"}
    ran = 0
    for index, (code, runs) in enumerate(python_blocks(text)):
        compiled = compile(code, f"{name}, python block {index + 1}", "exec")
        if runs:
            exec(compiled, namespace)
            ran += 1
    return ran


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    run_page(page.read_text(), page.relative_to(ROOT).as_posix())


def test_readme_quick_start_runs(capsys):
    text = README.read_text()
    start = text.index("```python", text.index("## Quick start")) + len("```python")
    code = text[start : text.index("```", start)]
    exec(compile(code, "README quick start", "exec"), {})
    loss = float(capsys.readouterr().out.split()[-1])
    assert loss < 0.2


def test_the_readme_test_command_is_the_one_ci_runs():
    command = "python -m pytest -q -n 2 tests"
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in [line.strip() for line in ci_lines]
    readme_bash = [code for language, code in code_blocks(README.read_text()) if language == "bash"]
    assert any(command in code.splitlines() for code in readme_bash)


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces
    to hyphens (fenced blocks are not headings)."""
    text = FENCE.sub("", text)
    headings = re.findall(r"^#+[ \t]+(.+?)[ \t]*$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_point_to_files_and_headings(page):
    missing = []
    text = page.read_text()
    for match in LINK.finditer(FENCE.sub("", text)):
        target, _, anchor = match["target"].partition("#")
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        linked = (page.parent / target) if target else page
        if not linked.exists():
            missing.append(match["target"])
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            missing.append(match["target"])
    assert not missing, f"{page.name} links to missing files or headings: {missing}"


def test_anchors_follow_github():
    page = "# Data parallelism\n## A CPU split into host devices\n```\n# not a heading\n```\n"
    assert anchors(page) == {"data-parallelism", "a-cpu-split-into-host-devices"}
    assert anchors("## From `torch.optim` to sgdjax") == {"from-torchoptim-to-sgdjax"}


def test_the_page_runner_runs_blocks_in_order_and_honours_the_marker():
    page = textwrap.dedent(
        """
        ```python
        x = 1
        ```
        ```bash
        exit 1
        ```
        - a list item:

          ```python
          x += 1
          ```
        ```python
        # not run: needs the data set
        raise RuntimeError("marked blocks do not run")
        ```
        ```python
        assert x == 2, x
        ```
        """
    )
    assert run_page(page, "example") == 3
    with pytest.raises(ZeroDivisionError):
        run_page("```python\n1 / 0\n```\n", "failing")
    with pytest.raises(SyntaxError):  # a marked block must still be valid Python
        run_page("```python\n# not run: long\ndef broken(:\n```\n", "broken")
    unmarked = "```python\n# a comment that is not the marker\nraise KeyError\n```\n"
    with pytest.raises(KeyError):
        run_page(unmarked, "unmarked")


@pytest.mark.parametrize("name", CORE_MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    import jax.numpy as jnp

    result = doctest.testmod(module, extraglobs={"jnp": jnp}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_the_flag_reference_and_the_presets_table_are_generated():
    spec = importlib.util.spec_from_file_location("make_flags", ROOT / "docs" / "make_flags.py")
    make_flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_flags)
    page = (ROOT / "docs" / "flags.md").read_text()
    stale = "docs/flags.md is stale: run python docs/make_flags.py"
    assert page == make_flags.generated_text(), stale
    parser = make_flags.load_cifar_script().build_parser()
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in ("-h", "--help") or f"`{flag}`" in page, flag
    training = (ROOT / "docs" / "training.md").read_text()
    assert training == make_flags.with_presets_table(training), (
        "docs/training.md's presets table is stale: run python docs/make_flags.py"
    )
