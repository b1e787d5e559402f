"""HF transformers: CLIP, DINOv2 (with registers), DINOv3 and SigLIP vision adapters; loader and folder writer."""
from ..base import Backend
from . import loader, writer

BACKEND = Backend("hf", adapters=loader.ADAPTERS, loaders=(loader.hf_loader,), writer=writer.write)
