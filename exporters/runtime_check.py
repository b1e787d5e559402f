"""Validate an exported graph run by any runtime (OpenVINO, an HF-layout ONNX file) the way
`onnx_export.validate_onnx` validates model.onnx: against the PyTorch baked model and the hooked
reference, at batch sizes that include one other than the export batch, with the same relative error,
tolerances and float64 judge (`within_fp32_noise`). The runtime is anything with ORT's
`run(output_names, {input_name: array})`; `RenamedSession` maps another graph's names onto the
`pixel_values` -> (`pooled`, `tokens`) interface.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import numpy as np
import torch

from surgery.parity import OutputError

from .onnx_export import (VIT_ONNX_SPEC, Comparison, OnnxReport, _exact_torch, _measure_against_fp64, _rebatch,
                          _torch_outputs)


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
    """Fill `report` (path, dtype, tolerance and export batch already set) with the comparisons.
    `pooled(model, pixels)` overrides which PyTorch output the runtime's `pooled` is compared with."""
    from surgery.bake import unbake
    from surgery.reference import hooked_reference

    spec = VIT_ONNX_SPEC
    fam, baked = loaded.family, loaded.model
    dev = next(baked.parameters()).device
    mdtype = next(baked.parameters()).dtype
    source = copy.deepcopy(baked)
    unbake(source, fam)

    def outputs(model: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = _torch_outputs(model, fam, x)
        if pooled is not None:
            out["pooled"] = pooled(model, x)
        return out

    def hooked(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with hooked_reference(source, loaded.recipe, fam):
            return outputs(source, x)
    refs = {"pytorch": lambda x: outputs(baked, x), "hooked_reference": hooked}
    comps = {(o, a): Comparison(o, a, OutputError(o), report.tolerance) for o in spec.output_names for a in refs}
    work = _rebatch(batches, report.export_batch_size)
    offset = 0
    with _exact_torch():
        for pixels in work:
            x = pixels.to("cpu", torch.float32).contiguous()
            got = dict(zip(spec.output_names, session.run(spec.output_names, {spec.input_names[0]: x.numpy()})))
            for against, fn in refs.items():
                want = fn(pixels.to(dev, mdtype))
                for o in spec.output_names:
                    g = torch.from_numpy(np.asarray(got[o]).astype(np.float32))
                    if g.shape != want[o].shape:
                        report.problems.append(f"output {o} has shape {tuple(g.shape)}, the model's "
                                               f"{tuple(want[o].shape)}")
                        return report
                    comps[(o, against)].error.update(g, want[o].float().cpu(), offset=offset)
            offset += len(x)
            report.batch_sizes.append(len(x))
    report.images = offset
    report.comparisons = list(comps.values())
    if report.failures() and pooled is None:
        _measure_against_fp64(report, session, baked, source, loaded, work)
    return report
