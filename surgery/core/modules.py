"""The modules a baked model is made of: the register token inserter and the split MLP.

Both are plain `nn.Module`s with buffers and parameters only (no forward hooks), so
`torch.jit.trace`, `torch.compile`, `torch.export` and ONNX export see the fix as ordinary graph ops.
They are also `torch.jit.script`-able and `torch.fx.symbolic_trace`-able (timm's own model tests run
both): fixed forward signatures, and no branch on a tensor's value or dtype at call time (the one
branch, RegisterMlp's graph form, follows whether an ONNX exporter or FX tracing is running).
Token layout everywhere: [prefix tokens (CLS, trained registers) | R test-time registers | patches].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


def signed_max(h: torch.Tensor, per_neuron: bool = False) -> torch.Tensor:
    """The value of largest |.| in each image of `h` [B, N, k] (sign kept; the first in token-major order on
    a tie, as argmax picks): over all tokens and all k units, [B, 1, 1]; per unit with `per_neuron`,
    [B, 1, k]. |.| is exact in every dtype, so half precision picks what float32 would."""
    if per_neuron:
        return h.gather(1, h.abs().argmax(dim=1, keepdim=True))
    B, N, k = h.shape
    flat = h.reshape(B, N * k)
    return flat.gather(1, flat.abs().argmax(dim=1, keepdim=True)).view(B, 1, 1)


def register_rows(
    h: torch.Tensor, num_prefix: int, num_registers: int, scale: float = 1.0, per_neuron: bool = False
) -> torch.Tensor:
    """The rows of `register_edit(h, ...)` that can be non-zero: prefix rows (unchanged) and register
    rows (scale * signed max), [B, num_prefix + num_registers, k]. Patch rows are all zero."""
    B, N, k = h.shape
    reg = (signed_max(h, per_neuron) * scale).expand(B, num_registers, k)
    return torch.cat([h[:, :num_prefix], reg], dim=1)


def register_edit(
    h: torch.Tensor, num_prefix: int, num_registers: int, scale: float = 1.0, per_neuron: bool = False
) -> torch.Tensor:
    """The test-time-register rule on register-neuron activations `h` [B, N, k].

    Register rows <- scale * signed max (value of largest |.| over all tokens, and over all k units
    unless `per_neuron`), patch rows <- 0, prefix (CLS) rows unchanged. Each image gets its own max.
    Written with gather/cat (no in-place row writes) so exported graphs keep a dynamic batch axis.
    """
    head = register_rows(h, num_prefix, num_registers, scale, per_neuron)
    return torch.cat([head, torch.zeros_like(h[:, num_prefix + num_registers:])], dim=1)


class PrependRegisters(nn.Module):
    """Inserts R constant register tokens after the prefix tokens, then applies the wrapped module.

    It replaces the model's pre-norm (timm `norm_pre`, CLIP `ln_pre`), so registers enter it as the
    reference defines: after the positional embedding was added, with no positional embedding of
    their own. The tokens are a persistent buffer (zeros by default) saved in the checkpoint.
    """

    def __init__(self, inner: nn.Module, num_registers: int, embed_dim: int, num_prefix: int) -> None:
        super().__init__()
        self.inner = inner
        self.num_prefix = int(num_prefix)
        self.num_registers = int(num_registers)
        self.register_buffer("register_tokens", torch.zeros(1, num_registers, embed_dim))

    def with_registers(self, x: torch.Tensor) -> torch.Tensor:
        reg = self.register_tokens.to(x.dtype).expand(x.shape[0], -1, -1)
        p = self.num_prefix
        return torch.cat([x[:, :p], reg, x[:, p:]], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one tensor in, one out (a pre-norm): a fixed signature TorchScript can compile
        return self.inner(self.with_registers(x))

    def extra_repr(self) -> str:
        return f"num_registers={self.num_registers}, num_prefix={self.num_prefix}"


class PrependRegistersToLayer(PrependRegisters):
    """PrependRegisters wrapping a transformer layer (models without a pre-norm: HF DINOv3, SigLIP),
    whose call also takes masks / rotary tables: extra arguments pass through unchanged."""

    def forward(self, x: torch.Tensor, *args, **kwargs):  # type: ignore[override]
        return self.inner(self.with_registers(x), *args, **kwargs)


@dataclass
class MlpWeights:
    """One canonical view of a transformer MLP, whatever library it came from.

    fc1 rows produce the pre-activation hidden units; gated MLPs pack [gate rows; up rows] and compute
    act(gate) * up. fc2 columns read the (post-activation) hidden units. A register neuron is a hidden
    unit index, i.e. a column of fc2.
    """

    fc1_weight: torch.Tensor
    fc1_bias: Optional[torch.Tensor]
    fc2_weight: torch.Tensor
    fc2_bias: Optional[torch.Tensor]
    act: nn.Module
    gated: bool = False

    @property
    def hidden(self) -> int:
        return self.fc2_weight.shape[1]


def _graph_form() -> bool:
    """Whether an ONNX exporter (dynamo or TorchScript-based) or FX symbolic tracing is running: RegisterMlp
    then writes its graph form, without an in-place write (called only outside TorchScript, which cannot
    compile this)."""
    fx = torch.fx._symbolic_trace  # is_fx_symbolic_tracing: torch >= 2.4 (is_fx_tracing logs a warning)
    return torch.onnx.is_in_onnx_export() or getattr(fx, "is_fx_symbolic_tracing", fx.is_fx_tracing)()


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _row_index(units: torch.Tensor, hidden: int, gated: bool) -> torch.Tensor:
    """Rows of fc1 that produce `units`; gated MLPs: the gate rows, then the up rows."""
    return torch.cat([units, hidden + units]) if gated else units


class RegisterMlp(nn.Module):
    """An MLP whose register units write their output through a small register branch.

        hidden = act(fc1 x)                     (fc1 as in the original model: every unit)
        out = fc2(hidden) + reg_fc2(register_edit(hidden[..., units]))   (branch: prefix + register rows only)

    fc1 is the original; the register units' columns of fc2 move to the branch (`reg_fc2`) and are zero
    in the ordinary fc2, so their activations reach the output only as the rule edits them. Keeping fc2's
    shape means the ordinary matrix multiplies run exactly as in the original model (no odd widths, which
    CPU GEMMs run several per cent slower) and, since a removed unit contributes an exact 0, the MLP's
    patch rows are computed exactly as the hooked reference computes them; the branch reads the register
    units' activations from the same fc1 GEMM and activation the reference hooks. `units` (buffer)
    records the original indices, so the split is exactly reversible (`merged_weights`).

    Forward is written for the fewest dispatched ops (in eager mode each is a kernel launch), the same in
    every dtype: besides the ordinary MLP, one `index_select` of the k register units' activations (none
    for one unit: a slice is a view), abs / argmax / gather for the signed max, one cat of the prefix
    rows and the register rows (none without prefix tokens), and one fused GEMM + add (`baddbmm_`) of
    those rows into the output's rows. Half precision stays in the model's dtype: the max is picked
    exactly (|.| is exact), and the fused GEMM accumulates the k register columns onto the ordinary rows
    in float before the one rounding, as the hooked reference's single down projection does.

    Checkpoints written by vit-surgery 0.1.0 stored the branch's own fc1 rows (`reg_fc1`) and zeroed them in fc1;
    loading one puts them back (`fold_legacy_branch`). The ONNX exporter restores that split form while
    it exports (exporters/register_branch_export.py: a float k-row branch INT8 can keep out of
    quantization, and fc2's input without the register units' large activations).
    """

    def __init__(
        self,
        weights: MlpWeights,
        units: list[int],
        num_prefix: int,
        num_registers: int,
        scale: float = 1.0,
        per_neuron: bool = False,
    ) -> None:
        super().__init__()
        hidden = weights.hidden
        # checked on the list, not the tensor: HF builds remote-code models on the meta device (no values)
        if not units or max(units) >= hidden or min(units) < 0:
            raise ValueError(f"register units {units} out of range for hidden width {hidden}")
        unit_list = sorted(int(u) for u in units)
        unit_idx = torch.tensor(unit_list, dtype=torch.long, device=weights.fc2_weight.device)
        rows_expected = hidden * (2 if weights.gated else 1)
        assert weights.fc1_weight.shape[0] == rows_expected, (weights.fc1_weight.shape, rows_expected)
        self.gated = weights.gated
        self.act = weights.act
        self.fc1 = _linear(weights.fc1_weight, weights.fc1_bias)
        self.fc2 = _linear(weights.fc2_weight, weights.fc2_bias)
        self.reg_fc2 = _linear(weights.fc2_weight[:, unit_idx], None)
        with torch.no_grad():  # the register units reach the output through the branch only
            self.fc2.weight[:, unit_idx] = 0.0
        self.register_buffer("units", unit_idx)
        self.hidden_features = hidden
        # one unit: its activations are a slice of fc1's (a view, no op); several: one index_select
        self.unit_slice = unit_list[0] if len(unit_list) == 1 else -1
        self.num_prefix = int(num_prefix)
        self.num_registers = int(num_registers)
        self.scale = float(scale)
        self.per_neuron = bool(per_neuron)
        # The export form (exporters/register_branch_export.py sets these while torch exports): the branch's
        # own k fc1 rows, and the activation it applies to them (an equivalent a runtime evaluates
        # accurately in the far tail). None / the MLP's own activation otherwise.
        self.register_module("reg_fc1", None)
        self.reg_act = self.act

    def _hidden(self, pre: torch.Tensor) -> torch.Tensor:
        if self.gated:
            half = pre.shape[-1] // 2  # [gate | up], as chunk(2) splits it
            return self.act(pre[..., :half]) * pre[..., half:]
        return self.act(pre)

    def _reg_hidden(self, pre: torch.Tensor) -> torch.Tensor:
        # _hidden with reg_act (TorchScript cannot pass a module as an argument, hence two methods)
        if self.gated:
            half = pre.shape[-1] // 2
            return self.reg_act(pre[..., :half]) * pre[..., half:]
        return self.reg_act(pre)

    def fc1_rows(self) -> torch.Tensor:
        """The rows of fc1 that produce the register units (gated: the gate rows, then the up rows)."""
        return _row_index(self.units, self.hidden_features, self.gated)

    def _unit_activations(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.unit_slice >= 0:
            return hidden[:, :, self.unit_slice:self.unit_slice + 1]
        return hidden.index_select(2, self.units)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """The branch's non-zero rows after the edit: prefix rows (unchanged) and register rows (the
        signed max), [B, q, k]; the output projection runs on these q rows alone."""
        B, N, k = h.shape
        p, q = self.num_prefix, self.num_prefix + self.num_registers
        m = signed_max(h, self.per_neuron)
        if self.scale != 1.0:  # a Python float fixed at build time: no multiply for the default scale
            m = m * self.scale
        if p == 0:  # no prefix token (SigLIP): the register rows alone, no cat
            return m.expand(B, q, k)
        return torch.cat([h[:, :p], m.expand(B, q - p, k)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self._hidden(self.fc1(x))
        out = self.fc2(hidden)
        q = self.num_prefix + self.num_registers
        if not torch.jit.is_scripting():  # (TorchScript skips this block: it compiles the eager path)
            if _graph_form():
                # ONNX: a write into rows of `out` would become ScatterND and its index arithmetic; an
                # add and a concat stay lean, with a dynamic batch axis, and keep `reg_fc2` a node of its
                # own. FX: its dead-code elimination (timm's feature extraction) drops an in-place op
                # whose result is not used.
                reg_fc1 = self.reg_fc1
                if reg_fc1 is not None:  # the exporters' split form (fc1's register rows are zero then)
                    h = self._reg_hidden(reg_fc1(x))
                else:
                    h = self._unit_activations(hidden)
                return torch.cat([out[:, :q] + self.reg_fc2(self._head(h)), out[:, q:]], dim=1)
        # Eager: the projection and the add in one fused GEMM, in place on `out` (made in this call;
        # fc2's backward reads its inputs, not its output). torch.export and torch.compile functionalise
        # the write.
        h = self._unit_activations(hidden)
        B, k = h.shape[0], h.shape[2]
        out[:, :q].baddbmm_(self._head(h), self.reg_fc2.weight.t().expand(B, k, out.shape[-1]))
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # type: ignore[no-untyped-def]
                              unexpected_keys, error_msgs) -> None:
        # a checkpoint of the earlier split layout: its reg_fc1 rows go back into fc1 (load_state_dict
        # hands each module a copy of the dict, and fc1 is loaded after this from the same dict)
        w_key, b_key = prefix + "reg_fc1.weight", prefix + "reg_fc1.bias"
        if w_key in state_dict and prefix + "fc1.weight" in state_dict and prefix + "units" in state_dict:
            fc1_w, fc1_b = fold_legacy_branch(
                state_dict[prefix + "fc1.weight"], state_dict.get(prefix + "fc1.bias"), state_dict[prefix + "units"],
                state_dict.pop(w_key), state_dict.pop(b_key, None))
            state_dict[prefix + "fc1.weight"] = fc1_w
            if fc1_b is not None:
                state_dict[prefix + "fc1.bias"] = fc1_b
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def merged_weights(self) -> MlpWeights:
        """The original (unsplit) MLP weights: the branch's fc2 columns put back in place."""
        units = self.units
        fc1_w = self.fc1.weight.detach().clone()
        fc1_b = None if self.fc1.bias is None else self.fc1.bias.detach().clone()
        fc2_w = self.fc2.weight.detach().clone()
        fc2_w[:, units] = self.reg_fc2.weight.detach()
        fc2_b = None if self.fc2.bias is None else self.fc2.bias.detach().clone()
        return MlpWeights(fc1_w, fc1_b, fc2_w, fc2_b, self.act, self.gated)

    def extra_repr(self) -> str:
        return (f"units={self.units.tolist()}, hidden={self.hidden_features}, gated={self.gated}, "
                f"num_prefix={self.num_prefix}, num_registers={self.num_registers}, scale={self.scale}, "
                f"per_neuron={self.per_neuron}")


@torch.no_grad()
def fold_legacy_branch(fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor], units: torch.Tensor,
                       reg_fc1_weight: torch.Tensor, reg_fc1_bias: Optional[torch.Tensor]
                       ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """fc1 (weight, bias) of a RegisterMlp from a checkpoint of the earlier split layout, in which the
    register units' fc1 rows lived in `reg_fc1` and were zero in fc1: those rows put back (new tensors).
    Gated MLPs (fc1 rows = 2 x hidden) hold the gate rows, then the up rows, in both."""
    units = units.to(torch.long).cpu()
    gated = reg_fc1_weight.shape[0] == 2 * len(units)  # [gate rows; up rows] of the k units
    hidden = fc1_weight.shape[0] // 2 if gated else fc1_weight.shape[0]
    rows = _row_index(units, hidden, gated)
    if reg_fc1_weight.shape[0] != len(rows) or reg_fc1_weight.shape[1:] != fc1_weight.shape[1:]:
        raise RuntimeError(f"Error(s) in loading state_dict: size mismatch for reg_fc1.weight: "
                           f"{tuple(reg_fc1_weight.shape)} for units {units.tolist()} of fc1 {tuple(fc1_weight.shape)}.")
    w = fc1_weight.clone()
    w[rows] = reg_fc1_weight.to(w.dtype)
    b = None
    if fc1_bias is not None:
        b = fc1_bias.clone()
        if reg_fc1_bias is not None:
            b[rows] = reg_fc1_bias.to(b.dtype)
    return w, b


def stores_legacy_branches(names: "list[str] | set[str]") -> bool:
    """Whether a checkpoint's tensor names hold 0.1.0's split register branches (`...reg_fc1.weight`)."""
    return any(n.endswith(".reg_fc1.weight") for n in names)


def attach_legacy_branches(model: nn.Module) -> None:
    """Give each RegisterMlp of `model` a `reg_fc1` of 0.1.0's shape (its k units' fc1 rows), for readers
    that fill a model by its own tensor names; `fold_attached_legacy_branches` puts the rows read into fc1."""
    for mod in model.modules():
        if isinstance(mod, RegisterMlp) and mod.reg_fc1 is None:
            w = mod.fc1.weight
            mod.reg_fc1 = nn.Linear(w.shape[1], len(mod.fc1_rows()), bias=mod.fc1.bias is not None, device=w.device,
                                    dtype=w.dtype)


@torch.no_grad()
def fold_attached_legacy_branches(model: nn.Module) -> None:
    """After `attach_legacy_branches` and a read: each `reg_fc1`'s rows back into fc1, `reg_fc1` removed."""
    for mod in model.modules():
        if isinstance(mod, RegisterMlp) and mod.reg_fc1 is not None:
            w_new, b_new = fold_legacy_branch(mod.fc1.weight, mod.fc1.bias, mod.units, mod.reg_fc1.weight,
                                              mod.reg_fc1.bias)
            mod.fc1.weight = nn.Parameter(w_new, requires_grad=mod.fc1.weight.requires_grad)
            if b_new is not None:
                mod.fc1.bias = nn.Parameter(b_new, requires_grad=mod.fc1.bias.requires_grad)
            mod.reg_fc1 = None
