"""What every backend package shares: the Backend record and the helpers its loaders and writers use."""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from torch import nn

from ..core.adapter import Adapter
from ..core.errors import ModelInputError, UnsafeCheckpointError
from ..core.source import LoadedModel, LoadOptions

# A loader returns None when the spec is not its kind, a LoadedModel, or raises a SurgeryError.
Loader = Callable[[str, LoadOptions], Optional[LoadedModel]]
# A writer saves the baked `model` as a folder of its library: (model, out_dir, loaded, surgery doc) -> files.
Writer = Callable[[nn.Module, Path, LoadedModel, dict[str, Any]], list[Path]]


@dataclass(frozen=True)
class Backend:
    """One library: the adapters for its module structures, its loaders and its folder writer."""

    name: str  # the library name recorded in LoadedModel.source.library
    adapters: tuple[Adapter, ...] = ()
    loaders: tuple[Loader, ...] = ()
    writer: Optional[Writer] = None


def adapter_among(adapters: Sequence[Adapter], model: nn.Module) -> Adapter:
    """The first of `adapters` that fits `model`, or a one-line error naming what was given."""
    for adapter in adapters:
        if adapter.matches(model):
            return adapter
    raise ModelInputError(
        f"unsupported model type {type(model).__name__}: vit-surgery works on Vision Transformers "
        "(timm VisionTransformer, open_clip VisionTransformer, HF CLIPVision/Dinov2)"
    )


def hub_file(repo_id: str, filename: str) -> Optional[Path]:
    """A file of a hub repo if it is in the local HF cache (no download)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        got = try_to_load_from_cache(repo_id, filename)
    except Exception:
        return None
    return Path(got) if isinstance(got, str) else None


# Files a library reads next to the weights (tokenizers, processors, labels): carried to the output as-is.
EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
               "added_tokens.json", "processor_config.json", "vocab.txt", "spiece.model", "tokenizer.model",
               "chat_template.jinja")


def extra_files(lookup: Callable[[str], Optional[Path]]) -> dict[str, str]:
    """{name: local path} of the EXTRA_FILES the source has; `lookup(name)` finds one or returns None."""
    found = {name: lookup(name) for name in EXTRA_FILES}
    return {name: str(p) for name, p in found.items() if p is not None and Path(p).is_file()}


def copy_extra_files(loaded: LoadedModel, out_dir: Path) -> list[Path]:
    """Copy the source's tokenizer/processor files into an output folder (never over a written file)."""
    import shutil

    written = []
    for name, path in sorted((loaded.extra.get("extra_files") or {}).items()):
        dst = out_dir / name
        if not dst.exists():
            shutil.copyfile(path, dst)
            written.append(dst)
    return written


def needs_full_unpickling(e: BaseException) -> bool:
    """torch.load(weights_only=True) refused the file: it holds more than tensors and plain containers."""
    return isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e) or "Weights only load failed" in str(e)


def unsafe_pickle_error(spec: str) -> UnsafeCheckpointError:
    """The one refusal for checkpoints that only load with full unpickling."""
    return UnsafeCheckpointError(
        f"{spec}: the checkpoint needs full unpickling, which can run arbitrary code; refused. "
        "Convert it to safetensors, or pass --allow-unsafe-pickle if you trust the file")
