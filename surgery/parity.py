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
    """Worst error of one named output.

    relative: max over feature vectors (each token of each image, or each pooled vector) of
    ||baked - reference|| / ||reference||, so a huge register token cannot hide errors elsewhere.
    max_abs: largest elementwise |baked - reference|. where: (image, token) of the worst vector.
    """

    name: str
    max_abs: float = 0.0
    relative: float = 0.0
    where: tuple[int, ...] = ()

    def update(self, got: torch.Tensor, ref: torch.Tensor, offset: int = 0) -> None:
        if got.shape != ref.shape:
            raise ValueError(f"{self.name}: shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
        if not ref.numel():
            return
        g, r = got.double(), ref.double()
        diff = g - r
        self.max_abs = max(self.max_abs, float(diff.abs().max()))
        ref_norm = r.norm(dim=-1)
        floor = 1e-6 * float(ref_norm.max()) + 1e-30  # vectors that are ~0 are judged against the scale
        rel = diff.norm(dim=-1) / ref_norm.clamp_min(floor)
        if not torch.isfinite(rel).all():
            rel = torch.where(torch.isfinite(rel), rel, torch.full_like(rel, float("inf")))
        m = float(rel.max())
        if m >= self.relative or not self.where:
            idx = torch.unravel_index(rel.argmax(), rel.shape)
            self.relative = max(m, self.relative)
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
        """Outputs out of tolerance, in forward order (block residuals, tokens, pooled)."""
        return [e for e in self.outputs.values() if e.relative > self.tolerance]

    def summary(self) -> str:
        w = self.worst
        verdict = "PASS" if self.passed else "FAIL"
        where = f" at (image, token) {tuple(w.where)}" if w.where else ""
        first = f"; first out of tolerance: {self.failures()[0].name}" if not self.passed else ""
        return (f"parity {verdict}: worst relative error {w.relative:.3g} (tolerance {self.tolerance:g}) "
                f"in {w.name}{where}, over {self.images} image(s){first}")

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "tolerance": self.tolerance, "images": self.images,
                "relative_error_definition": "max over feature vectors of ||baked - reference|| / ||reference||",
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
    # forward order, so the first failing output is where the divergence starts
    out = {f"block{i}.residual": r for i, r in enumerate(res)}
    out.update({"tokens": tokens, "pooled": pooled})
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
    included) and every block's residual stream. Relative error: see OutputError."""
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
