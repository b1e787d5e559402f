"""The environment that points the libraries at a fake offline hub cache (written by
`surgery.organism_families.write_fake_hub_repo`: the layout huggingface_hub reads with HF_HUB_OFFLINE=1)."""
from __future__ import annotations

from pathlib import Path


def offline_env(cache: Path) -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / "hf_home"))
    return env
