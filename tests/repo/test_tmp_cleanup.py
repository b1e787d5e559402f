"""The temporary-folder hooks (tests/helpers/tmp_cleanup.py): a fixture's folders go when the fixture ends, a passed
test's tmp_path goes when the test ends, and both stay when a test failed while they were in use."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HELPERS = Path(__file__).resolve().parents[1] / "helpers"  # tmp_cleanup.py, imported by the project below

CONFTEST = "from tmp_cleanup import pytest_fixture_post_finalizer, pytest_fixture_setup, pytest_terminal_summary\n"
MODULE = '''
import pytest

@pytest.fixture(scope="module")
def module_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("module_data_{name}")
    (d / "weights.bin").write_bytes(bytes(1 << 20))
    return d

def test_uses_it(module_data, tmp_path):
    (tmp_path / "out.bin").write_bytes(bytes(1 << 20))
    assert (module_data / "weights.bin").stat().st_size == 1 << 20 and {ok}
'''


def run_pytest(project: Path, basetemp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={basetemp}",
                           "-o", "tmp_path_retention_policy=failed", str(project)],
                          capture_output=True, text=True, env=env, cwd=project)


def test_a_fixtures_folders_go_when_it_ends_and_stay_when_a_test_failed(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "conftest.py").write_text(CONFTEST)
    (project / "test_passing.py").write_text(MODULE.format(name="passing", ok="True"))
    (project / "test_failing.py").write_text(MODULE.format(name="failing", ok="False"))
    (project / "pytest.ini").write_text("[pytest]\n")
    basetemp = tmp_path / "basetemp"
    proc = run_pytest(project, basetemp)
    assert proc.returncode == 1 and "1 failed, 1 passed" in proc.stdout, proc.stdout + proc.stderr
    left = sorted(p.name for p in basetemp.iterdir() if not p.is_symlink())
    # the passing module's fixture folder and its test's tmp_path are gone; the failing module's both stay
    assert left == ["module_data_failing0", "test_uses_it0"], left
    assert (basetemp / "test_uses_it0" / "out.bin").is_file()
    assert "temporary files removed as their fixtures ended" in proc.stdout
