"""DINOv2 torch-hub checkpoints (.pth): loaded into timm models, so they use timm's adapters and writer."""
from ..base import Backend
from . import loader

BACKEND = Backend("dinov2_hub", loaders=(loader.dinov2_hub_loader,))
