"""timm: VisionTransformer and Eva (DINOv3, EVA02, PE-Core) adapters, the timm loader and folder writer."""
from ..base import Backend
from . import loader, writer

BACKEND = Backend("timm", adapters=loader.ADAPTERS, loaders=(loader.timm_loader,), writer=writer.write)
