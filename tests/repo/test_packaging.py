"""The installed distribution: `pip install .` puts only the `surgery` package (and the dist-info) at the
top of site-packages; exporters/ is installed as `surgery.exporters`, and the source-checkout stand-in
surgery/exporters.py is not shipped (it would shadow the mapped package)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OFFLINE_WORDS = ("No matching distribution", "Could not find a version", "Failed to establish a new connection",
                 "Temporary failure in name resolution", "Network is unreachable")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
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
    return whl


@pytest.fixture(scope="module")
def wheel_names(wheel) -> list[str]:
    return zipfile.ZipFile(wheel).namelist()


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


def test_the_wheel_is_typed_and_ships_its_data_files(wheel_names):
    names = set(wheel_names)
    assert "surgery/py.typed" in names  # PEP 561: type checkers read the package's annotations
    assert "surgery/data/published_neurons.json" in names
    calibration = sorted(p.name for p in (ROOT / "surgery" / "data" / "calibration").glob("*.png"))
    assert calibration and all(f"surgery/data/calibration/{n}" in names for n in calibration)


def test_the_version_is_written_once(wheel):
    """pyproject.toml takes the version from surgery.__version__: the wheel's metadata says the same."""
    import surgery

    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        version = next(ln.split(":", 1)[1].strip() for ln in z.read(meta).decode().splitlines()
                       if ln.startswith("Version:"))
    assert version == surgery.__version__
    assert not re.search(r'^version\s*=\s*"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), flags=re.M)
