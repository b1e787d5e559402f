"""What the test modules share besides fixtures (those stay in tests/conftest.py): a relative-error measure
written independently of surgery.core.parity, the CLI in this process or as a subprocess command, an offline
hub cache, and images as one batch. Beside it: the rule written from the paper (tests/helpers/rule_reference.py),
the eager op counter (tests/helpers/op_count.py), other client versions (tests/helpers/client_envs.py), timm's
own model tests (tests/helpers/timm_sdist.py) and the temporary-folder hooks (tests/helpers/tmp_cleanup.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch


def pixels_from(folder: Path, transform, n: int | None = None) -> torch.Tensor:
    from surgery.core.images import ImageBatches, list_images

    files = list_images(folder)[:n] if n else list_images(folder)
    return torch.cat([x for x, _ in ImageBatches(files, transform, 8, progress=False)])


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
