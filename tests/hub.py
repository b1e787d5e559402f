"""A fake offline Hugging Face hub cache: the layout huggingface_hub reads with HF_HUB_OFFLINE=1."""
from __future__ import annotations

import shutil
from pathlib import Path

REVISION = "0123456789abcdef0123456789abcdef01234567"


def add_to_fake_hub(cache: Path, repo_id: str, files: dict[str, Path | bytes | str]) -> Path:
    """Lay out `models--ORG--NAME/refs/main` + `snapshots/<rev>/<files>` under `cache`; return the snapshot."""
    org, name = repo_id.split("/")
    repo = cache / f"models--{org}--{name}"
    snap = repo / "snapshots" / REVISION
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    for fname, content in files.items():
        dst = snap / fname
        dst.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, dst)
        elif isinstance(content, bytes):
            dst.write_bytes(content)
        else:
            dst.write_text(content)
    return snap


def offline_env(cache: Path) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf_home"))
    return env
