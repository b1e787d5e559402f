"""pytest hooks (imported by conftest.py): the temporary folders a fixture made go when the fixture ends.

pytest keeps every tmp_path and tmp_path_factory folder until the session ends (and three sessions of
them), which let one default run leave gigabytes of ViT-B checkpoints behind. tmp_path folders of passed
tests are removed by pytest itself (`tmp_path_retention_policy = "failed"` in pyproject.toml); the hooks
below do the same for the folders a module-, class- or function-scoped fixture makes with
tmp_path_factory.mktemp: they are removed when that fixture is finalized, unless a test failed while it
was alive (then they stay for debugging, as pytest keeps a failed test's tmp_path). Session-scoped
fixtures (a few MB here) are not seen by a tests/ conftest's hooks; pytest removes them after a passing run.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

_FIXTURE_DIRS: dict[int, tuple[list[Path], int]] = {}  # id(fixturedef) -> (folders it made, failures at setup)
_ATTRIBUTED: set[Path] = set()  # every folder already owned by a fixture (nested setups claim theirs first)
_REMOVED_BYTES = [0]


def _basetemp_children(request) -> set[Path]:
    base = request.config._tmp_path_factory.getbasetemp()  # pytest's own factory (pytest_configure sets it)
    return set(base.iterdir())


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    before = _basetemp_children(request)
    try:
        return (yield)
    finally:
        made = sorted(_basetemp_children(request) - before - _ATTRIBUTED)
        if made:
            _ATTRIBUTED.update(made)
            _FIXTURE_DIRS[id(fixturedef)] = (made, request.session.testsfailed)


def _remove_fixture_dirs(key: int, failed_now: int) -> None:
    made, failed_at_setup = _FIXTURE_DIRS.pop(key, ([], 0))
    if failed_now > failed_at_setup:
        return  # a test failed while these were in use: keep them to look at
    for folder in made:
        _ATTRIBUTED.discard(folder)
        if folder.is_symlink():  # pytest's `<name>current` link to the numbered folder
            folder.unlink(missing_ok=True)
            continue
        _REMOVED_BYTES[0] += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
        shutil.rmtree(folder, ignore_errors=True)


def pytest_fixture_post_finalizer(fixturedef, request):
    _remove_fixture_dirs(id(fixturedef), request.session.testsfailed)


def pytest_terminal_summary(terminalreporter):
    if _REMOVED_BYTES[0]:
        terminalreporter.write_line(f"temporary files removed as their fixtures ended: {_REMOVED_BYTES[0] / 2**30:.2f} GiB")
