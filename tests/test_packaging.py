"""The installed distribution: `pip install .` puts only the `surgery` package (and the dist-info) at the
top of site-packages; exporters/ is installed as `surgery.exporters`, and the source-checkout stand-in
surgery/exporters.py is not shipped (it would shadow the mapped package)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_WORDS = ("No matching distribution", "Could not find a version", "Failed to establish a new connection",
                 "Temporary failure in name resolution", "Network is unreachable")


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("surgery", "exporters"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True)
    if proc.returncode != 0 and any(w in proc.stderr for w in OFFLINE_WORDS):
        pytest.skip("building a wheel needs setuptools from the package index, which is unreachable")
    assert proc.returncode == 0, proc.stderr
    (whl,) = out.glob("*.whl")
    return zipfile.ZipFile(whl).namelist()


def test_only_surgery_lands_at_the_top_of_site_packages(wheel_names):
    tops = {n.split("/")[0] for n in wheel_names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"surgery"}, sorted(tops)


def test_exporters_ship_as_surgery_exporters_without_the_checkout_stand_in(wheel_names):
    names = set(wheel_names)
    repo_exporters = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "exporters").rglob("*.py"))
    assert repo_exporters, "exporters/ has no modules"
    for rel in repo_exporters:
        assert "surgery/" + rel in names, rel
    assert "surgery/exporters.py" not in names
    assert "surgery/cli/__main__.py" in names and "surgery/data/calibration" in "".join(names)
