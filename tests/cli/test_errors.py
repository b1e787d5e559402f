"""Exit codes: SurgeryError is abstract, every raise names its real kind, the table is built from the kinds
and matches the exit-codes page of the docs; core messages name parameters, the CLI shows flags."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from surgery.core import errors
from surgery.core.discovery import DiscoveryConfig
from surgery.core.errors import EXIT_CODES, ParameterError, SurgeryError, UsageError

ROOT = Path(__file__).resolve().parents[2]


def test_surgery_error_is_abstract_and_every_kind_has_a_code():
    with pytest.raises(TypeError, match="no exit code"):
        SurgeryError("anything")
    for kind in errors._kinds():
        assert isinstance(kind("x").exit_code, int) and kind("x").exit_code not in (0, 1)


def test_no_bare_surgery_error_is_raised_anywhere():
    bare = []
    for path in sorted(list((ROOT / "surgery").rglob("*.py")) + list((ROOT / "exporters").rglob("*.py"))):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                f = node.exc.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if name == "SurgeryError":
                    bare.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert bare == []


def test_exit_code_table_is_built_from_the_kinds_and_matches_the_docs():
    assert EXIT_CODES[2].startswith("Bad command-line usage") and 1 in EXIT_CODES and 143 in EXIT_CODES
    assert {k.exit_code for k in errors._kinds()} == set(EXIT_CODES) - {0, 1, 130, 143}
    page = (ROOT / "docs" / "reference" / "exit-codes.md").read_text(encoding="utf-8")
    table = page[page.index("## What each code covers"):]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", table, flags=re.M)}
    assert documented == set(EXIT_CODES)


def test_core_messages_name_parameters_and_the_cli_shows_flags():
    with pytest.raises(ParameterError) as e:
        DiscoveryConfig(top_k=0)
    assert str(e.value) == "top_k must be >= 1 or 'auto'"
    assert e.value.cli_message() == "--top-k must be >= 1 or 'auto'"
    assert isinstance(e.value, UsageError) and e.value.exit_code == 2
    with pytest.raises(ParameterError, match="threshold must be a positive number"):
        DiscoveryConfig(threshold="-3")


def test_other_kinds_name_parameters_too(tmp_path):
    from surgery.core.errors import OutputExistsError
    from surgery.core.outputs import check_output_target

    (tmp_path / "out{0}").mkdir()  # braces in a path are not placeholders
    with pytest.raises(OutputExistsError) as e:
        check_output_target(tmp_path / "out{0}", overwrite=False)
    assert "out{0} already exists" in str(e.value)
    assert str(e.value).endswith("pass overwrite to replace it")
    assert e.value.cli_message().endswith("pass --overwrite to replace it") and e.value.exit_code == 8
    # a message without parameters is used as it is (braces included) and survives pickling
    import pickle
    plain = OutputExistsError("output {x} exists")
    assert str(plain) == plain.cli_message() == "output {x} exists"
    assert str(pickle.loads(pickle.dumps(e.value))) == str(e.value)


def test_no_core_message_names_a_command_line_flag():
    """Core is the Python API too: a flag in its messages (`--top-k`) would be wrong there."""
    flagged = []
    for path in sorted((ROOT / "surgery" / "core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                text = "".join(c.value for c in ast.walk(node.exc) if isinstance(c, ast.Constant)
                               and isinstance(c.value, str))
                if re.search(r"(?<![\w-])--[a-z][a-z-]+", text):
                    flagged.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert flagged == []
