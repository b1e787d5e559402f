"""Validate an exported graph run by any runtime (OpenVINO, an HF-layout ONNX file) the way
`onnx_export.validate_onnx` validates model.onnx: against the hooked reference run in float64, per
feature vector, at batch sizes that include one other than the export batch, with the same tolerances
and conditioning rule (surgery/judge.py). The runtime is anything with ORT's
`run(output_names, {input_name: array})`; `RenamedSession` maps another graph's names onto the
`pixel_values` -> (`pooled`, `tokens`) interface.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import numpy as np
import torch

from surgery.core.parity import OutputError

from .onnx_export import VIT_ONNX_SPEC, Comparison, OnnxReport, _exact_torch, _rebatch, _torch_outputs


class RenamedSession:
    """Runs `run_fn(pixels) -> {name: array}` and answers under the VIT_ONNX_SPEC names."""

    def __init__(self, run_fn: Callable[[np.ndarray], dict[str, Any]], names: dict[str, str]) -> None:
        self.run_fn, self.names = run_fn, names  # names: spec name ("pooled", "tokens") -> runtime name

    def run(self, output_names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        got = self.run_fn(next(iter(feeds.values())))
        return [np.asarray(got[self.names.get(o, o)]) for o in output_names]


@torch.no_grad()
def validate_runtime(report: OnnxReport, session: Any, loaded: Any, batches: list[torch.Tensor],
                     pooled: Callable[[Any, torch.Tensor], torch.Tensor] | None = None) -> OnnxReport:
    """Fill `report` (path, dtype, tolerance and export batch already set) with the comparisons: each
    output judged against the hooked reference run in float64, per vector (surgery/judge.py).
    `pooled(model, pixels)` overrides which PyTorch output the runtime's `pooled` is compared with."""
    from surgery.core.bake import unbake
    from surgery.core.judge import as_float64, float64_reference

    spec = VIT_ONNX_SPEC
    fam, baked = loaded.family, loaded.model
    source = copy.deepcopy(baked)
    unbake(source, adapter=fam)
    source64 = as_float64(source)
    del source

    def capture(model: Any, family: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = _torch_outputs(model, family, x)
        if pooled is not None:
            out["pooled"] = pooled(model, x)
        return out

    tol = report.tolerance
    comps = {o: Comparison(o, "float64_reference", OutputError(o), tol) for o in spec.output_names}
    work = _rebatch(batches, report.export_batch_size)
    offset = 0
    with _exact_torch():
        for pixels in work:
            x = pixels.to("cpu", torch.float32).contiguous()
            got = dict(zip(spec.output_names, session.run(spec.output_names, {spec.input_names[0]: x.numpy()})))
            judge = float64_reference(source64, loaded.recipe, fam, x, capture)
            for o in spec.output_names:
                g = torch.from_numpy(np.asarray(got[o]).astype(np.float32))
                want = judge.exact[o].cpu()
                if g.shape != want.shape:
                    report.problems.append(f"output {o} has shape {tuple(g.shape)}, the model's {tuple(want.shape)}")
                    return report
                comps[o].error.update(g, want, offset=offset, allowed=judge.allowed(o, tol, g).cpu())
            offset += len(x)
            report.batch_sizes.append(len(x))
    report.images = offset
    report.comparisons = list(comps.values())
    return report
