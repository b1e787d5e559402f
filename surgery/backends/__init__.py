"""The one registry of library backends: adapters, loaders and writers, in dispatch order.

A new library is a package next to these (adapter, loader, writer) exposing `BACKEND`, plus one entry
in `BACKENDS` below. Order is dispatch order: the first loader that recognises a MODEL string loads
it (open_clip's before timm's, which refuses folders without config.json), the first adapter that
matches a module handles it.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..core.adapter import Adapter
from ..core.errors import ModelInputError
from ..core.integrity import assert_finite
from ..core.memory import trim_heap
from ..core.source import LoadedModel, LoadOptions, require_finite_weights
from . import dinov2_hub, hf, open_clip, timm
from .base import Backend, Writer, adapter_among

BACKENDS: tuple[Backend, ...] = (open_clip.BACKEND, timm.BACKEND, hf.BACKEND, dinov2_hub.BACKEND)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for `model`, or a one-line error naming what was given."""
    return adapter_among([a for b in BACKENDS for a in b.adapters], model)


def writer_for(library: str) -> Writer:
    """The folder writer for outputs of `library` (the source's library)."""
    writer: Optional[Writer] = next((b.writer for b in BACKENDS if b.name == library and b.writer), None)
    if writer is None:
        raise ModelInputError(f"no exporter for {library} models")
    return writer


def load_model(spec: str, options: LoadOptions | None = None) -> LoadedModel:
    """Load MODEL as the user typed it; any failure is a one-line SurgeryError."""
    opts = options or LoadOptions()
    for loader in (ld for b in BACKENDS for ld in b.loaders):
        loaded = loader(spec, opts)
        if loaded is not None:
            assert_finite(loaded.model, spec)
            loaded.model.eval()
            if not any(p.device.type == "meta" for p in loaded.model.parameters()):
                loaded.model.to(opts.device)  # (a streamed VLM's loader places what it holds itself)
            trim_heap()  # a state dict loaded whole and copied into the model is freed by now
            require_finite_weights(loaded)
            return loaded
    raise ModelInputError(unknown_model_message(spec))


# The spec prefixes the loaders above answer to (a bare timm name, a folder or an .onnx file need none).
MODEL_PREFIXES = ("open_clip:", "hf:", "hf-hub:", "local-dir:", "dinov2:")


def unknown_model_message(spec: str) -> str:
    """"unknown model", naming the valid prefixes (and the closest one) when `spec` starts with another."""
    import difflib
    import re

    m = re.match(r"^([A-Za-z][\w.\-]*:)(?!//)", spec)
    if not m or len(m.group(1)) <= 2:  # no prefix (or a Windows drive letter)
        return f"unknown model {spec!r}"
    close = difflib.get_close_matches(m.group(1).lower(), MODEL_PREFIXES, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"unknown model {spec!r}: {m.group(1)!r} is not a model prefix{hint}; valid prefixes: "
            f"{', '.join(MODEL_PREFIXES)} (or a timm model name, a folder or an .onnx file)")
