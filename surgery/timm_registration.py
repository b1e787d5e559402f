"""Register the baked timm architecture without importing timm at `import surgery` time.

`import surgery` must stay light (the CLI answers `--help` in well under a second), yet
`import surgery, timm; timm.create_model("local-dir:OUT")` must find `vit_surgery_baked`. So:
- timm already imported: register now (`register_timm`, costs nothing more);
- otherwise: a one-shot finder on `sys.meta_path` waits for timm's own import and registers right
  after timm's module has executed (a post-import hook), then removes itself.
`surgery.register_timm()` is the explicit path (idempotent). Stdlib only: this module runs at
`import surgery`.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any, Optional, Sequence


def register_timm() -> None:
    """Register `vit_surgery_baked` with timm's model registry (imports timm; idempotent)."""
    importlib.import_module("surgery.backends.timm.baked")


class _RegisterAfterExec(importlib.abc.Loader):
    """Runs timm's real loader, then registers; leaves the real loader on the module."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Optional[ModuleType]:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        register_timm()


class _TimmImportWatcher(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None) -> Any:
        if fullname != "timm":
            return None
        _remove_watcher()
        spec = importlib.util.find_spec("timm")  # the finders after this one
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def _remove_watcher() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TimmImportWatcher)]


def register_when_timm_is_imported() -> None:
    if "timm" in sys.modules:
        register_timm()
    elif not any(isinstance(f, _TimmImportWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmImportWatcher())
