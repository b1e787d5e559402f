"""vit-surgery: bake test-time registers into pretrained Vision Transformers.

Importing the package registers the `vit_surgery_baked` timm architecture, so
`timm.create_model('local-dir:OUT', pretrained=True)` loads baked checkpoints.
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import timm_baked  # noqa: F401  (registers the timm architecture)
from .bake import bake_registers, register_token_indices, unbake
from .discovery import DiscoveryConfig, DiscoveryResult, find_register_neurons
from .errors import SurgeryError
from .modules import PrependRegisters, RegisterMlp
from .parity import ParityReport, check_parity
from .recipe import Recipe, read_neurons_file
from .reference import hooked_reference
from .loaders_open_clip import open_clip_load  # noqa: E402  (one-call loader for open_clip outputs)

__all__ = [
    "DiscoveryConfig", "DiscoveryResult", "ParityReport", "PrependRegisters", "Recipe", "RegisterMlp",
    "SurgeryError", "bake_registers", "check_parity", "find_register_neurons", "hooked_reference",
    "open_clip_load", "read_neurons_file", "register_token_indices", "unbake",
]
