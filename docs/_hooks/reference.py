"""mkdocs hook: reference pages generated from the code, so they cannot drift from it.

A page holds a marker line and the hook replaces it when the site is built:

- `<!-- generated: cli -->`: every `vit-surgery` command's `--help`, from `surgery.cli.build_parser()`;
- `<!-- generated: exit-codes -->`: the exit-code table, from `surgery.core.errors.EXIT_CODES` and the
  `SurgeryError` kinds that carry each code.

The functions are plain so that tests/docs/test_docs.py can call them without building the site.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HELP_WIDTH = "100"  # argparse wraps to $COLUMNS: fixed, so the page is the same on every machine


def _import_surgery() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each subcommand, in the order `--help` lists them, nested ones too."""
    found = []
    for action in parser._actions:  # argparse exposes subparsers only through this attribute
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                found.append((name, helps.get(name, ""), sub))
                found += [(f"{name} {n}", h, p) for n, h, p in _subcommands(sub)]
    return found


def cli_reference_markdown() -> str:
    """Markdown for the command-line reference: the top-level help, then each subcommand's help."""
    _import_surgery()
    from surgery.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        parser = build_parser()
        parts = ["## vit-surgery", "```text\n" + parser.format_help().rstrip() + "\n```"]
        for name, help_line, sub in _subcommands(parser):
            parts += [f"## vit-surgery {name}", help_line.rstrip(".") + "." if help_line else "",
                      "```text\n" + sub.format_help().rstrip() + "\n```"]
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    return "\n\n".join(p for p in parts if p) + "\n"


def _error_kinds(cls: type) -> list[type]:
    kinds = []
    for sub in cls.__subclasses__():
        kinds += [sub] + _error_kinds(sub)
    return kinds


def exit_codes_markdown() -> str:
    """Markdown table: exit code, the `SurgeryError` kinds that exit with it, its meaning (EXIT_CODES)."""
    _import_surgery()
    from surgery.core.errors import EXIT_CODES, SurgeryError

    kinds: dict[int, list[str]] = {}
    for kind in _error_kinds(SurgeryError):
        kinds.setdefault(kind.exit_code, []).append(f"`{kind.__name__}`")
    rows = ["| code | raised as | meaning |", "|---|---|---|"]
    for code, meaning in EXIT_CODES.items():
        rows.append(f"| {code} | {', '.join(kinds.get(code, [])) or '–'} | {meaning.replace('|', '&#124;')} |")
    return "\n".join(rows) + "\n"


GENERATORS = {"<!-- generated: cli -->": cli_reference_markdown,
              "<!-- generated: exit-codes -->": exit_codes_markdown}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    for marker, generate in GENERATORS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, generate())
    return markdown
