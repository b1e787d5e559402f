"""open_clip: VisionTransformer towers and timm trunks in TimmModel towers; loader and folder writer."""
from ..base import Backend
from . import loader, writer

BACKEND = Backend("open_clip", adapters=loader.ADAPTERS, loaders=(loader.open_clip_loader,), writer=writer.write)
