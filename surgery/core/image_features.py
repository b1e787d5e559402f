"""A VLM's vision tower hands its image features on without the test-time registers.

A vision-language model selects image features by position (LLaVA: `hidden_states[layer][:, 1:]`
drops CLS; SigLIP towers: every token), so a register left in the tower's output would become an
extra image feature (one more feature than `<image>` placeholders, or a shifted image). A forward hook
on the tower removes the register rows from `last_hidden_state` and from every entry of
`hidden_states` after the tower has run; the tower itself (blocks, pre-norm, attention) still sees
them, which is the whole point.

The hook reads two attributes of the tower at call time, so the same hook serves the baked model, the
hooked reference (which raises the prefix count inside its context) and the unmodified source (where
nothing is removed): `surgery_native_prefix` (CLS count of the stock tower) and `num_prefix_tokens`
(prefix + registers while registers are present). torch only: the HF writer inlines this file into
the remote-code file of a baked VLM.
"""
from __future__ import annotations

import torch
from torch import nn

NATIVE_PREFIX_ATTR = "surgery_native_prefix"


def without_rows(t: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """t [B, N, D] without token rows [start, start + count)."""
    return torch.cat([t[:, :start], t[:, start + count:]], dim=1)


def drop_register_rows(tower: nn.Module, _args: tuple, output):  # type: ignore[no-untyped-def]
    """Forward hook: the tower's output with the register rows removed (None: output unchanged)."""
    native = int(getattr(tower, NATIVE_PREFIX_ATTR, 0))
    count = int(getattr(tower, "num_prefix_tokens", native)) - native
    last = getattr(output, "last_hidden_state", None)
    if count <= 0 or last is None:
        return None
    n = last.shape[1]  # tokens with the registers: only entries that long hold them
    output.last_hidden_state = without_rows(last, native, count)
    hidden = getattr(output, "hidden_states", None)
    if hidden is not None:
        output.hidden_states = tuple(h if h is None or h.shape[1] != n else without_rows(h, native, count)
                                     for h in hidden)
    return output


def install_register_drop(tower: nn.Module, native_prefix: int) -> None:
    """Make `tower` drop register rows from its outputs (idempotent)."""
    setattr(tower, NATIVE_PREFIX_ATTR, int(native_prefix))
    if not any(getattr(h, "__name__", "") == drop_register_rows.__name__ for h in tower._forward_hooks.values()):
        tower.register_forward_hook(drop_register_rows)
