"""The README's quick start and the docstring examples run as written."""

import doctest
import importlib
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

CORE_MODULES = [
    "sgdjax._alias", "sgdjax._averaging", "sgdjax._clipping", "sgdjax._combine",
    "sgdjax._decay", "sgdjax._diagnostics", "sgdjax._flatten", "sgdjax._lars",
    "sgdjax._lookahead", "sgdjax._momentum", "sgdjax._scale", "sgdjax._schedule_free",
    "sgdjax._skip", "sgdjax.schedules", "sgdjax.parallel._mesh",
]  # fmt: skip


@pytest.mark.parametrize("name", CORE_MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    import jax.numpy as jnp

    result = doctest.testmod(module, extraglobs={"jnp": jnp}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_readme_quick_start_runs(capsys):
    text = README.read_text()
    start = text.index("```python", text.index("## Quick start")) + len("```python")
    code = text[start : text.index("```", start)]
    exec(compile(code, "README quick start", "exec"), {})
    loss = float(capsys.readouterr().out.split()[-1])
    assert loss < 0.2
