"""The jobs behind find, convert and check when the model is an ONNX file or a folder of them (an HF ONNX
repo): the peer of surgery/pipeline.py for graphs (surgery/onnx_graph/ rewrites them, no PyTorch model).
`surgery.api` dispatches here; the CLI only parses and prints what comes back."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from . import __version__
from .core.discovery import DiscoveryConfig, DiscoveryResult
from .core.errors import NeuronsFileError, UsageError
from .core.images import split_batches
from .core.output_format import FP32_TOLERANCE, NEURONS_FILE, PARITY_FILE, write_json
from .core.progress import say
from .core.recipe import Recipe
from .pipeline import ConvertResult

CHECK_BATCH_SIZES = (1, 3, 8)


def is_onnx(spec: Optional[str | Path]) -> bool:
    """An .onnx file, or a folder of them (an HF ONNX repo): what this module handles."""
    from .onnx_graph.folder import is_onnx_folder

    return bool(spec) and (str(spec).lower().endswith(".onnx") or is_onnx_folder(str(spec)))


def _images_pixels(source: Path, images: Optional[str | Path], count: int, seed: int, progress: bool) -> torch.Tensor:
    from .core.images import ImageBatches, builtin_images, list_images
    from .onnx_graph.discover import transform_for
    from .onnx_graph.recognise import recognise

    tf, _ = transform_for(recognise(source))
    files = list_images(images or builtin_images(), count, seed)
    batches = ImageBatches(files, tf, 8, progress=progress, desc="check images")
    chunks = [x for x, _ in batches]
    batches.require_some(sum(len(c) for c in chunks))
    return torch.cat(chunks)


def check_batches(source: Path, images: Optional[str | Path], count: int, seed: int,
                  progress: bool) -> list[torch.Tensor]:
    """Check images through `source`'s preprocessing, in batches of several sizes (1, 3, the rest)."""
    pixels = _images_pixels(source, images, max(count, sum(CHECK_BATCH_SIZES[:2]) + 1), seed, progress)
    rest = len(pixels) - sum(CHECK_BATCH_SIZES[:2])
    return split_batches(pixels, list(CHECK_BATCH_SIZES[:2]) + [max(rest, 1)])


def find_source(spec: str | Path) -> str:
    """The ONNX file `find` runs on: the file itself, or a folder's fp32 model (onnx_graph/folder.py)."""
    from .onnx_graph.folder import is_onnx_folder, open_folder

    return str(open_folder(spec).find_source()) if is_onnx_folder(str(spec)) else str(spec)


def find_onnx(spec: str | Path, images: str | Path, config: Optional[DiscoveryConfig] = None,
              progress: bool = True) -> DiscoveryResult:
    from .onnx_graph.discover import find_register_neurons_onnx

    return find_register_neurons_onnx(find_source(spec), images, config or DiscoveryConfig(), progress=progress,
                                      provenance={"images": str(images), "tool_version": __version__})


def onnx_recipe(model: str, neurons: Optional[str], images: Optional[str | Path], config: Optional[DiscoveryConfig],
                overrides: dict[str, Any], progress: bool) -> tuple[Recipe, dict[str, Any]]:
    """The recipe and the neurons.json document for an ONNX input: from `neurons` (a file or a published
    set), else found on `images` in the graph `model`."""
    from .core.recipe import read_neurons_file

    if neurons:
        path = Path(neurons)
        if path.exists() or str(neurons).endswith(".json"):
            recipe, doc = read_neurons_file(path)
        else:
            from .published import published_neurons

            recipe, doc = published_neurons(str(neurons)), {"published": str(neurons)}
        return recipe.with_options(**overrides), doc
    if images:
        result = find_onnx(model, images, config, progress)
        return result.recipe.with_options(**overrides), result.to_json()
    raise NeuronsFileError("an ONNX model needs --neurons FILE or --images DIR (no published set is matched "
                           "to ONNX files)")


def convert_onnx_source(model: str, out: str | Path, *, neurons: Optional[str] = None,
                        images: Optional[str | Path] = None, discovery: Optional[DiscoveryConfig] = None,
                        overrides: Optional[dict[str, Any]] = None, check: bool = True,
                        check_images: Optional[str | Path] = None, tolerance: float = FP32_TOLERANCE,
                        overwrite: bool = False, progress: bool = True) -> ConvertResult:
    """convert for an ONNX file (OUT/model.onnx) or folder (every file rewritten): the recipe, the rewrite,
    the check against the hooked reference graph; a failure leaves nothing at `out`."""
    from .core.integrity import record_onnx_output
    from .core.outputs import atomic_output_dir, check_output_target
    from .onnx_graph.convert import convert_onnx, require_onnx_file
    from .onnx_graph.folder import convert_folder, is_onnx_folder, require_onnx_folder

    check_output_target(out, overwrite)
    overrides = overrides or {}
    if is_onnx_folder(model):
        source = require_onnx_folder(model)
        base = source.find_source() if not neurons else None
        recipe, doc = onnx_recipe(str(base) if base else model, neurons, images, discovery, overrides, progress)
        batches = check_batches(base or source.files[0], check_images or images, 16, 0, progress) if check else None
        say(f"rewriting {len(source.files)} ONNX file(s) of {source.root}: {recipe.num_neurons} register neuron(s), "
            f"R={recipe.num_registers}")
        with atomic_output_dir(out, overwrite) as tmp:
            summaries, report = convert_folder(source, tmp, recipe, check_batches=batches, tolerance=tolerance, say=say)
            write_json(tmp / NEURONS_FILE, doc)
            if report is not None:
                write_json(tmp / PARITY_FILE, {"onnx_folder": report.to_dict()})
            record_onnx_output(tmp, recipe.to_dict(), str(model))
        into = ", ".join(f"{k} ({s['precision']})" for k, s in summaries.items())
        return ConvertResult(Path(out), recipe, report, None, None, baked_into=into)
    path = require_onnx_file(model)
    recipe, doc = onnx_recipe(model, neurons, images, discovery, overrides, progress)
    batches = check_batches(path, check_images or images, 16, 0, progress) if check else None
    say(f"rewriting {path.name}: {recipe.num_neurons} register neuron(s), R={recipe.num_registers}")
    res = convert_onnx(path, out, recipe, overwrite=overwrite, check_batches=batches, tolerance=tolerance,
                       extra_files={NEURONS_FILE: doc})
    return ConvertResult(res.out, recipe, res.report, None, None, baked_into="the ONNX graph",
                         written_note=" (+ model.onnx.data)" if res.external_data else "")


def check_onnx_source(out: str | Path, source: Optional[str | Path], *, images: Optional[str | Path] = None,
                      num_images: int = 16, seed: int = 0, tolerance: Optional[float] = None,
                      progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """check of a rewritten ONNX file or folder against its source (required: the hooked reference graph
    is built on it). Returns the report and the --report document."""
    from .core.integrity import verify_before_check
    from .onnx_graph.check import check_onnx
    from .onnx_graph.convert import require_onnx_file
    from .onnx_graph.folder import check_folder, is_onnx_folder, require_onnx_folder
    from .core.errors import ModelInputError

    tol = FP32_TOLERANCE if tolerance is None else tolerance
    if is_onnx_folder(str(out)):
        folder = require_onnx_folder(out)
        if not source:
            raise UsageError("checking an ONNX folder needs --source ORIGINAL_FOLDER (the model it was made from)")
        verify_before_check(Path(out))
        src = require_onnx_folder(source)
        try:
            first = src.find_source()
        except ModelInputError:
            first = src.files[0]
        res = check_folder(folder, src, check_batches(first, images, num_images, seed, progress), tolerance=tol)
        return res, {"onnx_folder": res.to_dict()}
    baked = require_onnx_file(out)
    if not source:
        raise UsageError("checking an ONNX file needs --source ORIGINAL.onnx (the model it was made from)")
    src_path = require_onnx_file(source)
    verify_before_check(baked)
    report = check_onnx(baked, src_path, check_batches(src_path, images, num_images, seed, progress), tolerance=tol)
    return report, {"onnx": report.to_dict()}
