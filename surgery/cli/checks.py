"""What `vit-surgery` checks from the arguments and the file system alone, before any model loads and
before torch is imported: a mistake found here costs no waiting and gets its own exit code.

- the device (torch is imported only for a device other than cpu);
- every input: the model folder or file (when the spec names a path), images, neurons file, --source;
- OUT: creatable, never a special file, never one of the command's own inputs, nor inside or around one.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from ..core.errors import ModelInputError, UsageError

# prefixes whose rest is a path on this machine (hf: and open_clip: may also name hub ids)
_PATH_PREFIXES = ("local-dir:", "dinov2:")


def check_device(spec: str) -> None:
    """A device this machine has, else a usage error (exit 2). cpu needs no torch import."""
    if spec == "cpu":
        return
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {spec!r} is not a torch device ({str(e).splitlines()[0]})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: this machine has no usable CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {spec}: MPS is not available on this machine")


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or "/" in text or text.lower().endswith((".onnx", ".pth", ".pt"))


def check_model_spec(spec: Optional[str], what: str = "model") -> None:
    """A MODEL that names a path on this machine must be there (exit 4). Hub and library names
    (timm names, hf-hub:, hf:ORG/NAME, open_clip:ARCH/TAG) are left to the loaders."""
    if not spec:
        return
    for prefix in _PATH_PREFIXES:
        if spec.startswith(prefix):
            path = Path(spec[len(prefix):])
            if not path.exists():
                kind = "folder" if prefix == "local-dir:" else "file"
                raise ModelInputError(f"{what} {kind} not found: {path}")
            return
    if spec.startswith("hf:"):
        rest = spec[len("hf:"):]
        if rest.startswith((".", "/", "~")) and not Path(rest).exists():
            raise ModelInputError(f"{what} folder not found: {rest}")
        return
    if ":" in spec.split("/")[0]:  # another prefix (open_clip:, hf-hub:): hub or library names
        return
    if _looks_like_path(spec) and not Path(spec).exists():
        kind = "file" if spec.lower().endswith((".onnx", ".pth", ".pt")) else "folder"
        raise ModelInputError(f"{what} {kind} not found: {spec}")


def _check_config_size(spec: Optional[str]) -> None:
    """A local folder whose config.json describes a model too large to build here: exit 13 now (the
    loaders check again, for the Python API)."""
    import json

    from ..core.memory import require_config_fits, require_extras_fit

    if not spec:
        return
    path = Path(spec.split(":", 1)[1] if spec.startswith(("local-dir:", "hf:")) else spec)
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return  # no folder, no config, or unreadable: the loader says which
    if isinstance(cfg, dict):
        require_config_fits(spec, cfg)
        processors = []
        for name in ("preprocessor_config.json", "processor_config.json"):
            try:
                doc = json.loads((path / name).read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError):
                continue
            processors += [doc] if isinstance(doc, dict) else []
        require_extras_fit(spec, cfg, processors)


def _inputs(a: argparse.Namespace) -> dict[str, Optional[str]]:
    """Everything the command reads, by what the user calls it (for the OUT-overlap rule)."""
    named = {"model": "the source model", "images": "the images folder", "neurons": "the neurons file",
             "check_images": "the check images folder", "source": "the --source model", "dataset": "the dataset",
             "out_dir": "the converted folder"}
    return {words: getattr(a, key, None) for key, words in named.items()}


def validate_before_loading(a: argparse.Namespace) -> None:
    """Device, model path, images, neurons file and OUT, each with its own exit code."""
    from ..core.images import list_images
    from ..core.outputs import check_output_target, refuse_input_overlap
    from ..core.recipe import read_neurons_file

    if getattr(a, "device", None):
        if a.device == "auto":  # CUDA when there is one
            import torch

            a.device = "cuda" if torch.cuda.is_available() else "cpu"
        check_device(a.device)
    command = a.command
    if command == "check" and str(a.out_dir).lower().endswith(".onnx") and not a.source:
        raise UsageError("checking an ONNX file needs --source ORIGINAL.onnx (the model it was made from)")
    if command in ("find", "convert", "inspect", "eval"):
        check_model_spec(getattr(a, "model", None))
        _check_config_size(getattr(a, "model", None))
    if command in ("check", "eval"):
        check_model_spec(getattr(a, "out_dir", None), "converted")
    check_model_spec(getattr(a, "source", None), "--source model")
    for images in (getattr(a, "images", None), getattr(a, "check_images", None)):
        if images:
            list_images(images)
    neurons = getattr(a, "neurons", None)
    if neurons and (Path(neurons).exists() or neurons.endswith(".json")):
        read_neurons_file(neurons)
    out, kind, overwrite = output_of(a)
    if out is None:
        return
    check_output_target(out, overwrite, kind)
    refuse_input_overlap(out, _inputs(a))


def output_of(a: argparse.Namespace) -> tuple[Optional[str], str, bool]:
    """(OUT, "file"|"folder", overwrite) of a command that writes a new output; (None, ..) otherwise
    (export writes into the converted folder it reads: its own rules, surgery/cli/export.py)."""
    if a.command == "find":
        return a.out, "file", a.overwrite
    if a.command in ("convert", "demo", "inspect"):
        return a.out, "folder", a.overwrite
    if a.command == "check":  # the report replaces a file, never OUT's own (check does not modify OUT)
        return a.report, "file", True
    if a.command == "eval":
        return a.json, "file", a.overwrite
    return None, "file", False
