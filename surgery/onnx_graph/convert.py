"""`convert model.onnx`: recognise, bake, save (external data kept for large models), check, move into place."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import onnx_ir as ir
import torch

from ..core.errors import ParityError
from ..core.integrity import record_onnx_output
from ..core.output_format import FP32_TOLERANCE, ONNX_FILE, require_onnx_path, write_json
from ..core.output_format import ONNX_DATA_FILE as DATA_FILE
from ..core.outputs import atomic_output_dir, check_output_target, refuse_source_overlap
from ..core.recipe import Recipe
from .bake import bake_graph
from .check import OnnxCheckReport, check_onnx
from .discover import measure_layout
from .recognise import recognise

# protobuf cannot hold 2 GiB; above this (or when the source had external data) weights go to DATA_FILE
EXTERNAL_DATA_THRESHOLD = 2**31 - 64 * 2**20


def _weights_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _has_external(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def _remove_unused(model: ir.Model) -> None:
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)


@dataclass
class OnnxConvertResult:
    out: Path
    recipe: Recipe
    external_data: bool
    summary: dict[str, Any]
    report: Optional[OnnxCheckReport]


def convert_onnx(source: str | Path, out_dir: str | Path, recipe: Recipe, *, overwrite: bool = False,
                 check_batches: Optional[list[torch.Tensor]] = None, tolerance: float = FP32_TOLERANCE,
                 external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, extra_files: Optional[dict[str, Any]] = None
                 ) -> OnnxConvertResult:
    """Write OUT/model.onnx (+ model.onnx.data) with the registers baked into the graph. With
    `check_batches`, the result is checked against the hooked reference graph first; a failure raises
    ParityError and leaves nothing behind."""
    source = Path(source)
    out = check_output_target(out_dir, overwrite)
    refuse_source_overlap(out, str(source))
    vit = recognise(source)
    layout = measure_layout(vit)
    external = _has_external(vit.model)
    summary = bake_graph(vit, recipe, layout, source=str(source))
    _remove_unused(vit.model)
    external = external or _weights_bytes(vit.model) > external_data_threshold
    report = None
    # The shared output scheme (surgery/core/outputs.py): temporary sibling, usual modes, lock, no-replace
    # move, stale temporaries cleaned; a failure leaves OUT as it was.
    with atomic_output_dir(out, overwrite) as tmp:
        path = tmp / ONNX_FILE
        ir.save(vit.model, str(path), external_data=DATA_FILE if external else None)
        del vit
        if check_batches is not None:
            report = check_onnx(path, source, check_batches, tolerance=tolerance, recipe=recipe)
            report.path = str(out / ONNX_FILE)  # where it will be, never the temporary folder
            if not report.passed:
                raise ParityError(f"the rewritten ONNX model failed the check, nothing written: {report.summary()}")
        for name, doc in (extra_files or {}).items():
            write_json(tmp / name, doc)
        if report is not None:
            write_json(tmp / "parity.json", {"onnx": report.to_dict()})
        for f in ("preprocessor_config.json", "config.json"):  # keep the preprocessing (and HF config) next to the model
            if (source.parent / f).is_file():
                shutil.copyfile(source.parent / f, tmp / f)
        record_onnx_output(tmp, recipe.to_dict(), str(source))
    return OnnxConvertResult(out / ONNX_FILE, recipe, external, summary, report)


def require_onnx_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir() and (p / ONNX_FILE).is_file():
        return p / ONNX_FILE
    require_onnx_path(p)
    return p
