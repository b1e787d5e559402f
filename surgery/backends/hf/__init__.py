"""HF transformers: CLIP, DINOv2 (with registers), DINOv3 and SigLIP vision adapters, LLaVA-style VLMs
(their vision tower); loaders and folder writers."""
from pathlib import Path
from typing import Any

from torch import nn

from ..base import Backend
from . import loader, vlm, vlm_loader, vlm_writer, writer


def write(model: nn.Module, out: Path, loaded: Any, surgery: dict[str, Any]) -> list[Path]:
    """A VLM is written as the whole VLM folder, a vision model as the HF vision folder."""
    if isinstance(loaded.adapter, vlm.HFVisionLanguage):
        return vlm_writer.write_vlm_dir(model, out, loaded, surgery)
    return writer.write(model, out, loaded, surgery)


BACKEND = Backend("hf", adapters=loader.ADAPTERS + vlm.VLM_ADAPTERS, loaders=(vlm_loader.vlm_loader, loader.hf_loader),
                  writer=write)
