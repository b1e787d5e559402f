"""Shared fixtures: model organisms (small random ViTs with planted register neurons) and images."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# No per-stage progress lines from the CLI (tests read its errors as one stderr line); progress itself is
# tested with an explicit Progress (tests/test_first_model.py) and with VIT_SURGERY_PROGRESS=lines there.
os.environ.setdefault("VIT_SURGERY_PROGRESS", "off")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import surgery  # noqa: E402,F401  (registers the baked timm architecture)
from surgery.demo import save_organism  # noqa: E402
from surgery.organisms.vit import build_timm_organism, write_organism_images
from surgery.core.images import builtin_images  # noqa: E402


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


def pixels_from(folder: Path, transform, n: int | None = None) -> torch.Tensor:
    from surgery.core.images import ImageBatches, list_images

    files = list_images(folder)[:n] if n else list_images(folder)
    return torch.cat([x for x, _ in ImageBatches(files, transform, 8, progress=False)])


# ---- helpers shared by the test modules (`from conftest import ...`) ----------------------------------

def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst per-vector relative error ||a - b|| / ||b|| over the last axis (the parity definition), written
    out here independently of surgery.core.parity."""
    a, b = a.double().flatten(0, -2), b.double().flatten(0, -2)
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)).max())


def cli(args, capsys) -> tuple[int, str, str]:
    """Run `vit-surgery ARGS` in this process: (exit code, stdout, stderr)."""
    from surgery.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


CLI = [sys.executable, "-m", "surgery.cli"]  # the command in a subprocess (inherits PYTHONPATH)


def offline_env(cache: Path) -> dict[str, str]:
    """The environment that points a subprocess at a fake offline hub cache (written by
    `write_fake_hub_repo`: the layout huggingface_hub reads with HF_HUB_OFFLINE=1)."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf_home"))
    return env


def patch_offline_hub(mp: pytest.MonkeyPatch, cache: Path) -> Path:
    """Point this process's huggingface_hub at `cache`, offline (its constants are read at import time,
    so they are patched as well as the environment)."""
    import huggingface_hub.constants as hc

    cache.mkdir(parents=True, exist_ok=True)
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_HUB_CACHE", str(cache))
    mp.setattr(hc, "HF_HUB_CACHE", str(cache))
    mp.setattr(hc, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch) -> Path:
    """An empty HF hub cache, offline: hf-hub: names resolve only to what a test lays out in it."""
    return patch_offline_hub(monkeypatch, tmp_path / "hub")



# Temporary folders a fixture made are removed when it ends (tests/tmp_cleanup.py says how and why).
from tmp_cleanup import pytest_fixture_post_finalizer, pytest_fixture_setup, pytest_terminal_summary  # noqa: E402,F401
