"""The docs site: the reference pages generated from the code cover every command and exit code, every
page is in the site's navigation, and the README stays a short entry page that points into the docs.
(`mkdocs build --strict` itself runs in .ci/run; these checks need no mkdocs.)"""
from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

from surgery.cli import build_parser
from surgery.core.errors import EXIT_CODES

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _hook():
    spec = importlib.util.spec_from_file_location("docs_reference_hook", DOCS / "_hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _command_names(parser: argparse.ArgumentParser) -> set[str]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name for a in subs for name in a.choices}


def test_cli_reference_has_every_command_and_every_option():
    page = _hook().cli_reference_markdown()
    parser = build_parser()
    commands = _command_names(parser)
    assert {"find", "convert", "check", "demo", "export", "inspect", "eval"} <= commands
    assert set(re.findall(r"^## vit-surgery (\w+)$", page, flags=re.M)) == commands
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                section = page.split(f"## vit-surgery {name}\n", 1)[1].split("\n## ", 1)[0]
                flags = {s for a in sub._actions for s in a.option_strings if s.startswith("--")}
                assert flags and all(f in section for f in flags), (name, sorted(f for f in flags if f not in section))


def test_exit_code_page_lists_every_code_with_its_error_kind():
    rows = {int(code): (kinds, meaning) for code, kinds, meaning in
            re.findall(r"^\| (\d+) \| ([^|]*) \| (.*) \|$", _hook().exit_codes_markdown(), flags=re.M)}
    assert set(rows) == set(EXIT_CODES)
    assert "`ParityError`" in rows[7][0] and "`UsageError`" in rows[2][0] and rows[0][0] == "–"
    assert rows[13][1] == EXIT_CODES[13]


def test_generated_pages_carry_their_markers():
    markers = _hook().GENERATORS
    pages = {p: p.read_text(encoding="utf-8") for p in DOCS.rglob("*.md")}
    for marker in markers:
        assert sum(marker in text for text in pages.values()) == 1, marker


def test_every_page_is_in_the_navigation_and_every_nav_entry_exists():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", config.split("\nnav:", 1)[1], flags=re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "_hooks" not in p.parts}
    assert nav == pages


def test_readme_is_a_short_entry_page_pointing_into_the_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) <= 12 * 1024
    links = re.findall(r"\]\(((?:docs/)[^)#]+)", readme)
    assert len(links) >= 20 and all((ROOT / link).is_file() for link in links), links
    # the README's test command is the one CI runs
    command = 'pip install -e ".[test]" && pytest -q -n 2 --dist loadfile'
    assert command in readme
    assert command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
