"""Family adapters. Importing this package registers every adapter (one dispatch point: family_for)."""
from .base import AttentionParts, Family, family_by_name, family_for, register_family
from . import timm_vit  # noqa: F401  (registers)
from . import eva  # noqa: F401  (registers timm Eva: DINOv3, EVA02, PE-Core)
from . import hf_vit  # noqa: F401  (registers HF CLIP / DINOv2 and the HF loader)
from . import hf_current  # noqa: F401  (registers HF DINOv3 / SigLIP)
from . import open_clip_vit  # noqa: F401  (registers)
from . import open_clip_timm  # noqa: F401  (registers open_clip TimmModel towers)

__all__ = ["AttentionParts", "Family", "family_by_name", "family_for", "register_family"]
