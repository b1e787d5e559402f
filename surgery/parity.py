"""Parity: does a baked model compute what the hooked reference computes on the source model?"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from .families import Family, family_for
from .reference import hooked_reference
from .recipe import Recipe

FP32_TOLERANCE = 1e-5


@dataclass
class OutputError:
    """Worst error of one named output: max |a - b| and that divided by max |reference|."""

    name: str
    max_abs: float = 0.0
    ref_scale: float = 0.0
    where: tuple[int, ...] = ()

    @property
    def relative(self) -> float:
        return self.max_abs / self.ref_scale if self.ref_scale > 0 else self.max_abs

    def update(self, got: torch.Tensor, ref: torch.Tensor, offset: int = 0) -> None:
        if got.shape != ref.shape:
            raise ValueError(f"{self.name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
        diff = (got.double() - ref.double()).abs()
        m = float(diff.max()) if diff.numel() else 0.0
        self.ref_scale = max(self.ref_scale, float(ref.double().abs().max()))
        if m >= self.max_abs:
            idx = torch.unravel_index(diff.argmax(), diff.shape)
            self.max_abs = m
            self.where = (int(idx[0]) + offset,) + tuple(int(i) for i in idx[1:])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "max_abs": self.max_abs, "relative": self.relative, "where": list(self.where)}


@dataclass
class ParityReport:
    tolerance: float
    outputs: dict[str, OutputError] = field(default_factory=dict)
    images: int = 0

    @property
    def worst(self) -> OutputError:
        return max(self.outputs.values(), key=lambda e: e.relative)

    @property
    def passed(self) -> bool:
        return all(e.relative <= self.tolerance for e in self.outputs.values())

    def failures(self) -> list[OutputError]:
        return [e for e in self.outputs.values() if e.relative > self.tolerance]

    def summary(self) -> str:
        w = self.worst
        verdict = "PASS" if self.passed else "FAIL"
        where = f" at (image, token, channel) {tuple(w.where)}" if w.where else ""
        return (f"parity {verdict}: worst relative error {w.relative:.3g} (tolerance {self.tolerance:g}) "
                f"in {w.name}{where}, over {self.images} image(s)")

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "tolerance": self.tolerance, "images": self.images,
                "relative_error_definition": "max |baked - reference| / max |reference| per output",
                "worst": self.worst.to_dict(),
                "outputs": [e.to_dict() for e in self.outputs.values()]}


def _capture(model: nn.Module, fam: Family, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    res: list[torch.Tensor] = []
    hs = [b.register_forward_hook(lambda _m, _a, o: res.append(fam.block_output(o)))
          for b in fam.blocks(model)]
    try:
        pooled, tokens = fam.forward_both(model, pixels)
    finally:
        for h in hs:
            h.remove()
    out = {"pooled": pooled, "tokens": tokens}
    out.update({f"block{i}.residual": r for i, r in enumerate(res)})
    return out


@torch.inference_mode()
def check_parity(
    source: nn.Module,
    baked: nn.Module,
    recipe: Recipe,
    batches: Iterable[torch.Tensor],
    *,
    family: Family | None = None,
    tolerance: float = FP32_TOLERANCE,
) -> ParityReport:
    """Compare `baked` with `source` under the hooked reference: pooled output, every token (register
    included) and every block's residual stream. Relative error = max abs error / max |reference|."""
    fam = family or family_for(source)
    report = ParityReport(tolerance=tolerance)
    source.eval()
    baked.eval()
    dev = next(baked.parameters()).device
    dtype = next(baked.parameters()).dtype
    for pixels in batches:
        pixels = pixels.to(dev, dtype)
        with hooked_reference(source, recipe, fam):
            ref = _capture(source, fam, pixels)
        got = _capture(baked, fam, pixels)
        for name, r in ref.items():
            report.outputs.setdefault(name, OutputError(name)).update(got[name], r, offset=report.images)
        report.images += pixels.shape[0]
    return report
