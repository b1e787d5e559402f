"""A VLM's vision tower hands its image features on without the test-time registers.

A vision-language model selects image features by position (LLaVA: `hidden_states[layer][:, 1:]`
drops CLS; SigLIP towers: every token), so a register left in the tower's output would become an
extra image feature (one more feature than `<image>` placeholders, or a shifted image). The tower's
class is therefore extended, not hooked: `drop_registers_from_outputs` gives the tower the class
`RegisterDropping<Stock>` (the stock tower class with `DropRegisterRows` in front), whose `forward` runs
the stock forward and removes the register rows from `last_hidden_state` and from every entry of
`hidden_states`. The blocks, pre-norm and attention still see the registers, which is the whole point;
the printed module tree names the drop, and no forward hook is installed. The class keeps the stock
class's attributes and modules, so the tower's tensor names and the written layout are unchanged.

The drop reads two attributes of the tower at call time, so the same class serves the baked model, the
hooked reference (which raises the prefix count inside its context) and the unmodified source (where
nothing is removed): `surgery_native_prefix` (CLS count of the stock tower) and `num_prefix_tokens`
(prefix + registers while registers are present). torch only: the HF writer inlines this file into
the remote-code file of a baked VLM.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

NATIVE_PREFIX_ATTR = "surgery_native_prefix"
CLASS_PREFIX = "RegisterDropping"  # RegisterDropping<stock tower class>


def without_rows(t: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """t [B, N, D] without token rows [start, start + count)."""
    return torch.cat([t[:, :start], t[:, start + count:]], dim=1)


def without_register_rows(tower: nn.Module, output: Any) -> Any:
    """The tower's output with the register rows removed from `last_hidden_state` and from every
    `hidden_states` entry as long (a tuple output, or one without registers: unchanged)."""
    native = int(getattr(tower, NATIVE_PREFIX_ATTR, 0))
    count = int(getattr(tower, "num_prefix_tokens", native)) - native
    last = getattr(output, "last_hidden_state", None)
    if count <= 0 or last is None:
        return output
    n = last.shape[1]  # tokens with the registers: only entries that long hold them
    output.last_hidden_state = without_rows(last, native, count)
    hidden = getattr(output, "hidden_states", None)
    if hidden is not None:
        output.hidden_states = tuple(h if h is None or h.shape[1] != n else without_rows(h, native, count)
                                     for h in hidden)
    return output


class DropRegisterRows:
    """Put in front of a vision tower's class: `forward` is the stock forward, then the register rows
    leave the outputs (`without_register_rows`)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return without_register_rows(self, super().forward(*args, **kwargs))  # type: ignore[misc]


def register_dropping_class(stock: type) -> type:
    """`RegisterDropping<stock>`: the stock tower class with `DropRegisterRows` in front, made once per class."""
    name = CLASS_PREFIX + stock.__name__
    made = globals().get(name)
    if isinstance(made, type) and issubclass(made, stock) and made.__mro__[1] is DropRegisterRows:
        return made
    # the stock class's module: transformers treats classes from elsewhere as custom code and then skips
    # the stock tower's checkpoint renaming rules (hub names `vision_tower.vision_model.*`) when loading
    made = type(name, (DropRegisterRows, stock), {"__module__": stock.__module__, "__qualname__": name,
                                                  "__doc__": f"{stock.__name__} whose outputs leave out the "
                                                             "test-time register rows."})
    globals()[name] = made
    return made


def _keep_output_recording(tower: nn.Module, stock: type) -> None:
    """transformers 5 records `hidden_states` for the model classes it saw built (a registry keyed by
    class); the extended class records what the stock class does. Nothing to do elsewhere (4.x)."""
    import sys

    capturing = sys.modules.get("transformers.utils.output_capturing")
    registry = getattr(capturing, "_CAN_RECORD_REGISTRY", None)
    if registry is not None and hasattr(tower, "_can_record_outputs"):
        registry[tower] = tower._can_record_outputs
    # its checkpoint renaming rules (hub names `vision_tower.vision_model.*`) are looked up by class name
    conversion = sys.modules.get("transformers.conversion_mapping")
    rules = conversion.get_checkpoint_conversion_mapping(stock.__name__) if conversion is not None else None
    if rules:
        conversion.register_checkpoint_conversion_mapping(type(tower).__name__, rules, overwrite=True)


def drop_registers_from_outputs(tower: nn.Module, native_prefix: int) -> None:
    """Make `tower` leave the register rows out of its outputs: its class becomes
    `RegisterDropping<its class>` (idempotent; modules, tensors and their names are untouched)."""
    setattr(tower, NATIVE_PREFIX_ATTR, int(native_prefix))
    if isinstance(tower, DropRegisterRows):
        return
    stock = type(tower)
    tower.__class__ = register_dropping_class(stock)
    _keep_output_recording(tower, stock)
