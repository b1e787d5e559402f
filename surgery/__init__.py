"""vit-surgery: bake test-time registers into pretrained Vision Transformers.

The package is light to import (no torch, timm, transformers): the public names below load their
module on first use (PEP 562), so `vit-surgery --help` answers at once. The baked timm architecture
`vit_surgery_baked` is still registered for `import surgery, timm` users: right away when timm is
already imported, otherwise the moment timm is (see `surgery.timm_registration`). Then
`timm.create_model('local-dir:OUT', pretrained=True)` loads baked checkpoints.
"""
from __future__ import annotations

import importlib
from typing import Any

from .timm_registration import register_when_timm_is_imported  # stdlib only

__version__ = "0.1.0"

# public name -> the submodule that defines it (imported on first attribute access)
_LAZY = {
    "bake_registers": "core.bake", "register_token_indices": "core.bake", "unbake": "core.bake",
    "DiscoveryConfig": "core.discovery", "DiscoveryResult": "core.discovery", "find_register_neurons": "core.discovery",
    "SurgeryError": "core.errors",
    "PrependRegisters": "core.modules", "RegisterMlp": "core.modules",
    "ParityReport": "core.parity", "check_parity": "core.parity",
    "Recipe": "core.recipe", "read_neurons_file": "core.recipe",
    "hooked_reference": "core.reference",
    "open_clip_load": "backends.open_clip.loader", "adapter_for": "backends",
    "find": "api", "convert": "api", "check": "api", "export": "api", "bake": "api", "load": "api",
    "register_timm": "timm_registration",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:  # AttributeError lets `from surgery import submodule` fall back to importing it
        raise AttributeError(f"module 'surgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


register_when_timm_is_imported()
