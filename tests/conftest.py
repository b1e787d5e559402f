"""Shared fixtures (only fixtures: shared functions live in tests/helpers/): model organisms (small random ViTs
with planted register neurons), images, an offline hub cache."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# No per-stage progress lines from the CLI (tests read its errors as one stderr line); progress itself is
# tested with an explicit Progress (tests/cli/test_first_model.py) and with VIT_SURGERY_PROGRESS=lines there.
os.environ.setdefault("VIT_SURGERY_PROGRESS", "off")
# Threads per test process: the cores shared out among pytest-xdist's workers (`pytest -n 2` on a 2-core
# machine: one each), so that parallel workers do not oversubscribe the cores; at most 2 in one process.
# Subprocesses the tests start (the CLI, client venvs) inherit the same through OMP_NUM_THREADS.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
torch.set_num_threads(_THREADS)

import surgery  # noqa: E402,F401  (registers the baked timm architecture)
from surgery.demo import save_organism  # noqa: E402
from surgery.organisms.vit import build_timm_organism, write_organism_images
from surgery.core.images import builtin_images  # noqa: E402

from tests.helpers import patch_offline_hub  # noqa: E402


@pytest.fixture(scope="session")
def calib_dir() -> Path:
    """The built-in calibration images (24 PNGs, 64 px, patch-aligned dark/bright triggers)."""
    return builtin_images()


@pytest.fixture(scope="session")
def unseen_images(tmp_path_factory) -> Path:
    """Images the discovery defaults were never tuned on (other seed, other count)."""
    d = tmp_path_factory.mktemp("unseen")
    write_organism_images(d, count=20, seed=1234)
    return d


@pytest.fixture(scope="session")
def timm_organism():
    """(model, planting) for the CLIP-style timm organism."""
    return build_timm_organism(0, "clip")


@pytest.fixture(scope="session")
def organism_dir(tmp_path_factory, timm_organism) -> Path:
    """The CLIP-style organism saved as an ordinary timm local-dir (config.json + model.safetensors)."""
    return save_organism(timm_organism[0], tmp_path_factory.mktemp("organism") / "model")


@pytest.fixture(scope="session")
def baked_dir(tmp_path_factory, organism_dir, calib_dir) -> Path:
    """A converted organism (convert with discovery, parity checked)."""
    from surgery.backends import load_model
    from surgery.pipeline import run_convert

    out = tmp_path_factory.mktemp("baked") / "out"
    run_convert(load_model(str(organism_dir)), out, images=calib_dir, progress=False)
    return out


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch) -> Path:
    """An empty HF hub cache, offline: hf-hub: names resolve only to what a test lays out in it."""
    return patch_offline_hub(monkeypatch, tmp_path / "hub")


# Temporary folders a fixture made are removed when it ends (tests/helpers/tmp_cleanup.py says how and why).
from tests.helpers.tmp_cleanup import pytest_fixture_post_finalizer, pytest_fixture_setup, pytest_terminal_summary  # noqa: E402,F401
