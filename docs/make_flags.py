"""Writes docs/flags.md, the flag reference of experiments/cifar.py, from its parser,
and the presets table of docs/training.md from ``Config`` and ``PRESETS``.

    python docs/make_flags.py          # rewrite docs/flags.md and the presets table
    python docs/make_flags.py --check  # exit 1 if either is not what it would write

tests/test_docs.py checks that the committed pages equal the generated text, so the
reference cannot drift from ``--help`` and the table cannot drift from the presets.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "flags.md"
TRAINING_PAGE = ROOT / "docs" / "training.md"
TABLE_HEADER = "| field / flag | default |"


def load_cifar_script():
    """experiments/cifar.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("cifar_flags", ROOT / "experiments" / "cifar.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _value(action: argparse.Action) -> str:
    """What follows the flag: its choices, its metavar, or nothing for a switch."""
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        return "{" + ", ".join(str(choice) for choice in action.choices) + "}"
    metavar = action.metavar or action.dest.upper()
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    if action.nargs in ("+", "*"):
        return f"{metavar} [{metavar} ...]"
    if isinstance(action.nargs, int) and action.nargs > 1 and not isinstance(action.metavar, tuple):
        return " ".join([metavar] * action.nargs)
    return metavar


def _row(action: argparse.Action) -> str:
    flags = ", ".join(f"`{flag}`" for flag in action.option_strings)
    value = _value(action)
    help_text = "" if action.help in (None, argparse.SUPPRESS) else action.help
    help_text = help_text % {"default": action.default} if "%(" in help_text else help_text
    default = action.default
    shown = "" if default in (None, False) or action.nargs == 0 else f"`{default}`"
    return f"| {flags} | {_cell(value)} | {_cell(help_text)} | {shown} |"


def render(parser: argparse.ArgumentParser) -> str:
    """The page: the parser's description, then one table per argument group."""
    lines = [
        "# Command-line flags of `experiments/cifar.py`",
        "",
        "Generated from the script's parser by `python docs/make_flags.py`; do not edit by",
        "hand. The same text as `python experiments/cifar.py --help`, as tables.",
        "",
        _cell(parser.description or ""),
    ]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        lines += ["", f"## {group.title[:1].upper()}{group.title[1:]}", ""]
        if group.description:
            lines += [_cell(group.description), ""]
        lines += ["| flag | value | meaning | default |", "|---|---|---|---|"]
        lines += [_row(action) for action in actions]
    return "\n".join(lines) + "\n"


def generated_text() -> str:
    return render(load_cifar_script().build_parser())


def _config_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return " ".join(_config_value(v) for v in value)
    return str(value)


def presets_table() -> list[str]:
    """One row per ``Config`` field: its default and each preset's value (``·``: the
    default), then its help text and choices."""
    import dataclasses

    from sgdjax.training import PRESETS, Config

    default = Config()
    lines = [
        f"{TABLE_HEADER} {' | '.join(PRESETS)} | meaning |",
        "|---|---|" + "---|" * len(PRESETS) + "---|",
    ]
    for field in dataclasses.fields(Config):
        base = getattr(default, field.name)
        cells = [
            "·" if value == base and base is not None else _config_value(value)
            for value in (getattr(preset, field.name) for preset in PRESETS.values())
        ]
        meaning = field.metadata["help"]
        if field.metadata.get("choices"):
            meaning += " (" + ", ".join(map(str, field.metadata["choices"])) + ")"
        flag = "--" + field.name.replace("_", "-")
        row = [f"`{field.name}` / `{flag}`", _config_value(base), *cells, meaning]
        lines.append("| " + " | ".join(_cell(cell) for cell in row) + " |")
    return lines


def with_presets_table(page: str) -> str:
    """``page`` with its presets table (the lines from ``TABLE_HEADER`` on) generated."""
    lines = page.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(TABLE_HEADER))
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[:start] + presets_table() + lines[end:]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    training = TRAINING_PAGE.read_text()
    pages = {PAGE: generated_text(), TRAINING_PAGE: with_presets_table(training)}
    if args.check:
        stale = [page for page, text in pages.items() if page.read_text() != text]
        for page in stale:
            print(f"{page.relative_to(ROOT)} is out of date: run python docs/make_flags.py")
        return 1 if stale else 0
    for page, text in pages.items():
        page.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
