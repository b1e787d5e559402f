"""How a rewritten precision variant of an ONNX model (what hub repos ship next to model.onnx) is judged.

Its precision is read from its graph (`precision.py`). Each rewritten variant is checked twice:
1. against the hooked reference written into its *own* source graph (`check.check_onnx`), with the
   tolerance of its precision (`precision.TOLERANCES`: measured on the organisms, ~10x margin). The bake reproduces
   the source's arithmetic (fc1 untouched; a dynamically quantized INT8 fc2 input is edited in place,
   `bake._edit_in_place`, so its quantizer sees the hooked reference's tensor), so
   quantized variants agree to float32 round-off; float16 adds float16 rounding of the branch sum;
2. against the hooked reference on the *fp32* source (`judge_against_fp32`), so a wrong bake cannot hide
   under quantization noise: every vector except the register rows must be within `FP32_JUDGE_FACTOR`
   times the error that the unbaked variant itself has against the unbaked fp32 source (its precision's
   own noise, measured on the same images), plus the fp32 tolerance. The register rows have no unbaked
   counterpart: they are judged by check 1 only (with per-tensor INT8 their error against fp32 is of
   order 1 in the hooked reference itself: the register carries the sink's large values).
   A variant whose *unbaked* outputs are further than `VARIANT_NOISE_MAX` from the fp32 source's is not a
   precision variant of it (another model under the variant's name: its own error would make any bound
   pass): it fails, whatever the baked error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.parity import OutputError
from ..core.recipe import Recipe
from ..core.verdict import verdict_word
from .check import hooked_reference_graph
from .precision import FP32_TOLERANCE
from .discover import measure_layout
from .recognise import load_ir, recognise
from .runtime import ExposedSession

FP32_JUDGE_FACTOR = 4.0
# unbaked variant vs unbaked fp32 source, worst relative error per feature vector: float16 ~1e-3, INT8 /
# 4-bit ~0.01-0.11 on the ViT organisms and up to 0.95 on a VLM organism's projected image features
# (per-tensor INT8); another model of the same shape ~1.5
VARIANT_NOISE_MAX = {"fp16": 0.05, "fp32": 0.05}
VARIANT_NOISE_MAX_QUANTIZED = 1.2


@dataclass
class Fp32Judgement:
    variant: str
    fp32_source: str
    factor: float = FP32_JUDGE_FACTOR
    noise_max: float = VARIANT_NOISE_MAX_QUANTIZED  # the variant's precision's (VARIANT_NOISE_MAX)
    baked: dict[str, OutputError] = field(default_factory=dict)  # rewritten variant vs hooked fp32 reference
    baseline: dict[str, OutputError] = field(default_factory=dict)  # unbaked variant vs unbaked fp32 source

    def bound(self, name: str) -> float:
        return self.factor * self.baseline[name].relative + FP32_TOLERANCE

    @property
    def not_a_variant(self) -> list[str]:
        """Outputs whose unbaked error against the fp32 source is beyond any precision's noise."""
        return [n for n, e in self.baseline.items() if not e.relative <= self.noise_max]

    @property
    def passed(self) -> bool:
        return not self.not_a_variant and all(e.relative <= self.bound(n) for n, e in self.baked.items())

    def summary(self) -> str:
        head = f"{Path(self.variant).name} against the fp32 hooked reference {verdict_word(self.passed)}"
        if self.not_a_variant:
            n = self.not_a_variant[0]
            return (f"{head}: {Path(self.variant).name} is not a precision variant of {Path(self.fp32_source).name}: "
                    f"unbaked, its {n} differs from the fp32 file's by {self.baseline[n].relative:.3g} relative "
                    f"(its precision's noise stays below {self.noise_max:g}; another model?)")
        parts = [f"{n} {e.relative:.2e} (bound {self.bound(n):.2e} = {self.factor:g} x unbaked "
                 f"{self.baseline[n].relative:.2e} + {FP32_TOLERANCE:g})" for n, e in self.baked.items()]
        return f"{head}: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "fp32_source": self.fp32_source, "factor": self.factor,
                "variant_noise_max": self.noise_max,
                "excludes": "register rows (no unbaked counterpart; judged against the variant's own reference)",
                "outputs": {n: {"relative": e.relative, "where": list(e.where), "bound": self.bound(n),
                                "unbaked_relative": self.baseline[n].relative} for n, e in self.baked.items()},
                "summary": self.summary()}


def _without_registers(a: np.ndarray, p: int, R: int, tokens: int) -> np.ndarray:
    """Token outputs [B, N + R, D] -> [B, N, D] without the register rows; other outputs unchanged."""
    if a.ndim == 3 and a.shape[1] == tokens + R:
        return np.concatenate([a[:, :p], a[:, p + R:]], axis=1)
    return a


@torch.no_grad()
def judge_against_fp32(baked: str | Path, variant_source: str | Path, fp32_source: str | Path,
                       batches: list[torch.Tensor], recipe: Recipe) -> Fp32Judgement:
    """Check 2 of the module doc."""
    from .precision import precision_of

    variant = recognise(variant_source)
    noise_max = VARIANT_NOISE_MAX.get(precision_of(variant, measure_layout(variant)), VARIANT_NOISE_MAX_QUANTIZED)
    del variant
    j = Fp32Judgement(str(baked), str(fp32_source), noise_max=noise_max)
    vit32 = recognise(fp32_source)
    layout = measure_layout(vit32)
    p, R, N = layout.num_prefix, recipe.num_registers, layout.num_tokens
    sessions = {
        "baked": ExposedSession(load_ir(baked), [], str(baked)),
        "ref32": ExposedSession(hooked_reference_graph(fp32_source, recipe, layout), [], "fp32 hooked reference"),
        "variant": ExposedSession(load_ir(variant_source), [], str(variant_source)),
        "src32": ExposedSession(vit32.model, [], str(fp32_source)),
    }
    try:
        names = sessions["baked"].output_names
        j.baked = {n: OutputError(n) for n in names}
        j.baseline = {n: OutputError(n) for n in names}
        offset = 0
        for pixels in batches:
            x = pixels.float().numpy()
            out = {k: s.run(x)[0] for k, s in sessions.items()}
            for i, n in enumerate(names):
                def t(a: np.ndarray) -> torch.Tensor:
                    return torch.from_numpy(np.asarray(a, dtype=np.float32))
                j.baked[n].update(t(_without_registers(out["baked"][i], p, R, N)),
                                  t(_without_registers(out["ref32"][i], p, R, N)), offset)
                j.baseline[n].update(t(out["variant"][i]), t(out["src32"][i]), offset)
            offset += len(x)
    finally:
        for s in sessions.values():
            s.close()
    return j
