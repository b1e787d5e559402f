"""timm's own generic model tests (`tests/test_models.py`, shipped in timm's sdist, not its wheel), made
runnable against a baked vit-surgery folder.

`timm_model_tests()` downloads the sdist of the installed timm version with pip (cached in the user cache
dir: $VIT_SURGERY_TEST_CACHE, else $XDG_CACHE_HOME/vit-surgery or ~/.cache/vit-surgery), extracts
tests/test_models.py and imports it; it skips the calling test with the reason when the sdist cannot be
had (no network, no pip). `register_baked_folder(name, folder)` registers a timm model name whose
entrypoint builds `local-dir:folder` (the baked output, as users load it), with the folder's
pretrained_cfg as the name's default config, so timm's test functions, which take model names, run on it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

default_cfgs: dict[str, dict[str, Any]] = {}  # read by timm's register_model for this module's entrypoints


def cache_dir() -> Path:
    root = os.environ.get("VIT_SURGERY_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vit-surgery")
    return Path(root)


def _extract_test_models(version: str) -> Path:
    """tests/test_models.py of timm==version, downloaded once and cached."""
    here = cache_dir() / f"timm-{version}-tests"
    target = here / "test_models.py"
    if target.is_file():
        return target
    here.mkdir(parents=True, exist_ok=True)
    sdists = here / "sdist"
    cmd = [sys.executable, "-m", "pip", "download", f"timm=={version}", "--no-deps", "--no-binary", ":all:",
           "-q", "-d", str(sdists)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"timm {version} sdist not available ({type(e).__name__}): timm's model tests not run")
    archives = sorted(sdists.glob(f"timm-{version}.tar.gz"))
    if done.returncode != 0 or not archives:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"timm {version} sdist not available (pip download: {tail[0]}): timm's model tests not run")
    with tarfile.open(archives[0]) as tar:
        member = tar.getmember(f"timm-{version}/tests/test_models.py")
        data = tar.extractfile(member).read()  # type: ignore[union-attr]
    tmp = target.with_suffix(f".{os.getpid()}.tmp")  # parallel workers (pytest -n) each write their own
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


def timm_model_tests() -> ModuleType:
    """timm's tests/test_models.py of the installed timm, imported as a module."""
    import timm

    name = "timm_sdist_test_models"
    if name in sys.modules:
        return sys.modules[name]
    path = _extract_test_models(timm.__version__)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    try:
        with warnings.catch_warnings():  # timm's CI marks (base, cfg, features, ...) are unknown here
            warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
            spec.loader.exec_module(module)  # type: ignore[union-attr]
    except ImportError as e:  # e.g. torchvision missing: timm's fx tests need it
        del sys.modules[name]
        pytest.skip(f"timm's test_models.py does not import here: {e}")
    return module


def register_baked_folder(name: str, folder: Path) -> str:
    """Register timm model `name` as `local-dir:folder` (idempotent per name)."""
    import timm
    from timm.models import register_model

    cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    default_cfgs[name] = dict(cfg, architecture=name)

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> Any:
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(k, None)  # the folder's own config.json resolves these
        return timm.create_model(f"local-dir:{folder}", pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    register_model(entrypoint)
    return name
