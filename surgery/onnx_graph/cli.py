"""`vit-surgery find|convert|check` when MODEL is an .onnx file (dispatched from surgery/cli/main.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from .. import __version__
from ..core.errors import NeuronsFileError, ParityError, UsageError

CHECK_BATCH_SIZES = (1, 3, 8)


def is_onnx(spec: Optional[str]) -> bool:
    from .folder import is_onnx_folder

    return bool(spec) and (str(spec).lower().endswith(".onnx") or is_onnx_folder(spec))


def _say(a: argparse.Namespace, msg: str) -> None:
    if not getattr(a, "quiet", False):
        print(f"vit-surgery: {msg}", file=sys.stderr)


def _images_pixels(source: Path, images: Optional[str], count: int, seed: int, progress: bool) -> torch.Tensor:
    from ..core.images import ImageBatches, list_images
    from ..core.images import builtin_images
    from .discover import transform_for
    from .recognise import recognise

    tf, _ = transform_for(recognise(source))
    folder = images or builtin_images()
    files = list_images(folder, count, seed)
    batches = ImageBatches(files, tf, 8, progress=progress, desc="check images")
    chunks = [x for x, _ in batches]
    batches.require_some(sum(len(c) for c in chunks))
    return torch.cat(chunks)


def check_batches(source: Path, images: Optional[str], count: int, seed: int, progress: bool) -> list[torch.Tensor]:
    from .check import rebatch

    pixels = _images_pixels(source, images, max(count, sum(CHECK_BATCH_SIZES[:2]) + 1), seed, progress)
    rest = len(pixels) - sum(CHECK_BATCH_SIZES[:2])
    return rebatch(pixels, list(CHECK_BATCH_SIZES[:2]) + [max(rest, 1)])


def cmd_find_onnx(a: argparse.Namespace, config: Any) -> int:
    from ..core.outputs import atomic_output_file
    from ..pipeline import write_json
    from .discover import find_register_neurons_onnx

    out = Path(a.out)
    prov = {"images": str(a.images), "tool_version": __version__}
    result = find_register_neurons_onnx(_find_source(a.model), a.images, config, progress=not a.quiet,
                                        provenance=prov)
    with atomic_output_file(out, a.overwrite) as tmp:
        write_json(tmp, result.to_json())
    print(result.summary())
    print(f"wrote {out}")
    return 0


def _find_source(spec: str) -> str:
    """The ONNX file `find` runs on: the file itself, or a folder's fp32 model (folder.py)."""
    from .folder import is_onnx_folder, open_folder

    return str(open_folder(spec).find_source()) if is_onnx_folder(spec) else spec


def _recipe(a: argparse.Namespace, config: Any, model: Optional[str] = None) -> tuple[Any, dict[str, Any]]:
    from ..core.recipe import read_neurons_file
    from .discover import find_register_neurons_onnx

    overrides = {"num_registers": a.num_registers, "scale": a.scale, "mode": a.mode}
    if a.neurons:
        path = Path(a.neurons)
        if path.exists() or a.neurons.endswith(".json"):
            recipe, doc = read_neurons_file(path)
        else:
            from ..published import published_neurons

            recipe, doc = published_neurons(a.neurons), {"published": a.neurons}
        return recipe.with_options(**overrides), doc
    if a.images:
        result = find_register_neurons_onnx(model or a.model, a.images, config, progress=not a.quiet,
                                            provenance={"images": str(a.images), "tool_version": __version__})
        return result.recipe, result.to_json()
    raise NeuronsFileError("an ONNX model needs --neurons FILE or --images DIR (no published set is matched "
                           "to ONNX files)")


def cmd_convert_onnx(a: argparse.Namespace, config: Any) -> int:
    from .convert import convert_onnx, require_onnx_file
    from .folder import is_onnx_folder

    if is_onnx_folder(a.model):
        from .folder_cli import cmd_convert_folder
        return cmd_convert_folder(a, config, _recipe, check_batches, _say)

    if getattr(a, "to", "native") != "native" or getattr(a, "onnx", False) or getattr(a, "fp16", False):
        raise UsageError("--to, --onnx and --fp16 apply to PyTorch models; an ONNX input is written as "
                           "OUT/model.onnx")
    from ..core.outputs import check_output_target

    check_output_target(a.out, a.overwrite)
    source = require_onnx_file(a.model)
    recipe, doc = _recipe(a, config)
    batches = None if a.no_check else check_batches(source, a.check_images or a.images, 16, 0, not a.quiet)
    _say(a, f"rewriting {source.name}: {recipe.num_neurons} register neuron(s), R={recipe.num_registers}")
    res = convert_onnx(source, a.out, recipe, overwrite=a.overwrite, check_batches=batches, tolerance=a.tolerance,
                       extra_files={"neurons.json": doc})
    units = ", ".join(f"{k}: {list(v)}" for k, v in recipe.neurons.items())
    print(f"baked {recipe.num_neurons} register neuron(s) ({units}), R={recipe.num_registers} into the ONNX graph")
    if res.report is not None:
        print(res.report.summary())
    print(f"wrote {res.out}" + (" (+ model.onnx.data)" if res.external_data else ""))
    return 0


def cmd_check_onnx(a: argparse.Namespace) -> int:
    from ..pipeline import write_json
    from .check import check_onnx
    from .convert import require_onnx_file
    from .folder import is_onnx_folder

    if is_onnx_folder(a.out_dir):
        from .folder_cli import cmd_check_folder
        return cmd_check_folder(a, check_batches)

    from ..core.integrity import verify_onnx_output
    from ..core.outputs import atomic_output_file

    baked = require_onnx_file(a.out_dir)
    if not a.source:
        raise UsageError("checking an ONNX file needs --source ORIGINAL.onnx (the model it was made from)")
    source = require_onnx_file(a.source)
    verify_onnx_output(baked)
    batches = check_batches(source, a.images, a.num_images, a.seed, not a.quiet)
    report = check_onnx(baked, source, batches, tolerance=a.tolerance)
    if a.report:  # check never writes next to the model it checks
        with atomic_output_file(Path(a.report), True) as tmp:
            write_json(tmp, {"onnx": report.to_dict()})
    print(report.summary())
    if a.report:
        print(f"wrote {a.report}")
    if not report.passed:
        raise ParityError(report.summary())
    return 0
