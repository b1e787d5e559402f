"""The register branch's activation, written so runtimes evaluate its far negative tail accurately in float32.

Why. On an image without outliers the register neurons' signed max lies in the activation's far negative
tail (QuickGELU(-6) ~ -2e-4), where float32 activation kernels are accurate in absolute, not relative,
terms (onnxruntime's Sigmoid, OpenVINO's, PyTorch's CPU erf): they disagree by 1e-4 to 1e-2 relative
there, and that value is the register token. Exports used to compute the branch in float64, but
onnxruntime (1.30 at optimisation EXTENDED/ALL, transformers.js's default) fuses a float64 QuickGELU into
`com.microsoft.QuickGelu`, which has float kernels only: the model did not load.

How. Every activation of the sigmoid family is x * sigmoid(z(x)) (the table, with its constants, is
surgery/core/activations.py's SIGMOID_GATES: QuickGELU, SiLU, tanh GELU). `TailAccurateSigmoidGate` computes sigmoid as
where(z >= 0, 1, e) / (1 + e) with e = exp(-|z|): one Exp, accurate to an ulp or two relative everywhere,
no cancellation, no Sigmoid op for a runtime to fuse, all float32. The activation is recognised by its
values in float64 (not its class: open_clip, timm and transformers each have their own QuickGELU), and
only the register branch's copy (`RegisterMlp.reg_act`) is replaced, only while exporting: the ordinary
MLP keeps the model's own activation (and its fused kernel), the PyTorch model is unchanged. Exact GELU
(erf) is left as it is: no sigmoid form.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from surgery.core.activations import SIGMOID_GATES

class TailAccurateSigmoidGate(nn.Module):
    """x * sigmoid(z(x)) with z = alpha * x (cubic = 0) or z = alpha * (x + cubic * x^3)."""

    def __init__(self, kind: str, alpha: float, cubic: float = 0.0) -> None:
        super().__init__()
        self.kind, self.alpha, self.cubic = kind, float(alpha), float(cubic)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.alpha * (x + self.cubic * x * x * x) if self.cubic else self.alpha * x
        e = torch.exp(-torch.abs(z))
        sig = torch.where(z >= 0, torch.ones_like(e), e) / (1.0 + e)
        return x * sig

    def extra_repr(self) -> str:
        return f"{self.kind}: x * sigmoid(z), sigmoid via exp(-|z|)"


def tail_accurate_equivalent(act: nn.Module) -> Optional[TailAccurateSigmoidGate]:
    """The sigmoid-family form of `act` when its float64 values match one (else None: e.g. exact GELU)."""
    x = torch.linspace(-12.0, 12.0, 481, dtype=torch.float64)
    try:
        with torch.no_grad():
            y = act(x)
    except Exception:  # an activation that cannot run in float64 on the CPU: leave it as it is
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != torch.float64:
        return None
    for kind, (alpha, cubic) in SIGMOID_GATES.items():
        gate = TailAccurateSigmoidGate(kind, alpha, cubic)
        want = gate(x)
        if torch.allclose(y, want, rtol=1e-9, atol=1e-12):  # (float64 tanh GELU cancels in the far tail)
            return gate
    return None


@contextlib.contextmanager
def tail_accurate_register_branches(model: nn.Module) -> Iterator[list[str]]:
    """Within the context, every RegisterMlp whose activation has a sigmoid form computes its register
    branch's activation with `TailAccurateSigmoidGate`. Yields the names of the MLPs changed."""
    from surgery.core.modules import RegisterMlp

    changed: list[tuple[str, RegisterMlp, nn.Module]] = []
    try:
        for name, mod in model.named_modules():
            if isinstance(mod, RegisterMlp):
                gate = tail_accurate_equivalent(mod.act)
                if gate is not None:
                    changed.append((name, mod, mod.reg_act))
                    mod.reg_act = gate
        yield [name for name, _, _ in changed]
    finally:
        for _, mod, act in changed:
            mod.reg_act = act
