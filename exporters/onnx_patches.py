"""What the model needs while torch exports it (optimum's model_patcher): a float32 interface around
`forward_both`, the MHA fast path off, TF32 off while PyTorch outputs serve as references. The register
branch's tail-accurate float32 activation is the patch in exporters/tail_accurate_activation.py.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn


class ExportWrapper(nn.Module):
    """family.forward_both as a module with a float32 interface (fp16 exports cast inside the graph)."""

    def __init__(self, model: nn.Module, family: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.dtype = dtype

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, tokens = self.family.forward_both(self.model, pixel_values.to(self.dtype))
        return pooled.float(), tokens.float()


# ---- small helpers -----------------------------------------------------------------------------

@contextlib.contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    """open_clip's nn.MultiheadAttention fast path becomes aten::_native_multi_head_attention, which the
    exporters cannot translate; the ordinary path computes the same thing."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    prev = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(prev)


@contextlib.contextmanager
def exact_torch() -> Iterator[None]:
    """No TF32 on CUDA while PyTorch outputs serve as references."""
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c


