"""The modules a baked model is made of: the register token inserter and the split MLP.

Both are plain `nn.Module`s with buffers and parameters only (no hooks, no Python-side state), so
`torch.jit.trace`, `torch.compile`, `torch.export` and ONNX export see the fix as ordinary graph ops.
Token layout everywhere: [prefix tokens (CLS, trained registers) | R test-time registers | patches].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module


def register_edit(
    h: torch.Tensor, num_prefix: int, num_registers: int, scale: float = 1.0, per_neuron: bool = False
) -> torch.Tensor:
    """The test-time-register rule on register-neuron activations `h` [B, N, k].

    Register rows <- scale * signed max (value of largest |.| over all tokens, and over all k units
    unless `per_neuron`), patch rows <- 0, prefix (CLS) rows unchanged. Each image gets its own max.
    Written with gather/cat (no in-place row writes) so exported graphs keep a dynamic batch axis.
    """
    B, N, k = h.shape
    if per_neuron:
        idx = h.abs().argmax(dim=1, keepdim=True)  # [B, 1, k]
        m = h.gather(1, idx)
    else:
        flat = h.reshape(B, N * k)
        idx = flat.abs().argmax(dim=1, keepdim=True)  # [B, 1]
        m = flat.gather(1, idx).reshape(B, 1, 1).expand(B, 1, k)
    reg = (m * scale).expand(B, num_registers, k)
    p, r = num_prefix, num_registers
    return torch.cat([h[:, :p], reg, torch.zeros_like(h[:, p + r:])], dim=1)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reg = self.register_tokens.to(x.dtype).expand(x.shape[0], -1, -1)
        p = self.num_prefix
        return self.inner(torch.cat([x[:, :p], reg, x[:, p:]], dim=1))

    def extra_repr(self) -> str:
        return f"num_registers={self.num_registers}, num_prefix={self.num_prefix}"


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


# The split leaves fc1 with H - k output rows (3069 of 3072, say). On CPU (MKL) a GEMM whose output
# rows are not a multiple of 16 floats is 5-8 % slower per fc1 call on ViT-B/16 shapes. So in plain
# eager float32 CPU inference the ordinary path computes fc1 into rows padded to 16 floats (pad
# columns zeroed), applies the activation to the whole padded buffer (as the unsplit model does, fully
# vectorised) and reads fc2's input as a strided view: same parameters, same kernels (addmm, as
# F.linear runs for a contiguous input), bitwise the same values. Anything else (non-contiguous input,
# missing biases, autograd, tracing, export, compile, autocast, hooks on fc1/fc2 or global module
# hooks, gated MLPs, unknown activations, other dtypes or devices) takes `fc2(act(fc1(x)))` as before.
_ALIGN = 16
PAD_FC1_ROWS = True  # switch for benchmarks (bench_latency compares both); the values are the same either way
_ELEMENTWISE_ACTS = (nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity)
_ELEMENTWISE_ACT_NAMES = {  # activation classes of timm, open_clip and transformers known to be elementwise
    "GELU", "GELUTanh", "QuickGELU", "SiLU", "Swish", "ReLU", "Tanh", "Sigmoid", "Identity", "GELUActivation",
    "QuickGELUActivation", "NewGELUActivation", "FastGELUActivation", "PytorchGELUTanh", "SiLUActivation",
}


def _elementwise(act: nn.Module) -> bool:
    if type(act) in _ELEMENTWISE_ACTS:
        return True
    mod = type(act).__module__ or ""
    return type(act).__name__ in _ELEMENTWISE_ACT_NAMES and mod.startswith(("timm.", "open_clip.", "transformers."))


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _exporting() -> bool:
    fn = getattr(torch.compiler, "is_exporting", None)
    return bool(fn()) if fn is not None else False


def _plain_linear(x: torch.Tensor, lin: nn.Module) -> bool:
    """Calling F.linear instead of `lin(x)` is unobservable: a plain nn.Linear without hooks."""
    return (type(lin) is nn.Linear and lin.weight.dtype == x.dtype and not lin._forward_hooks
            and not lin._forward_pre_hooks)


def _plain_eager(x: torch.Tensor) -> bool:
    """Eager float32 CPU inference on a real, contiguous 2-D/3-D tensor: no autograd, tracing, compiling,
    exporting, autocast or global module hooks."""
    return (type(x) is torch.Tensor and x.dtype == torch.float32 and x.device.type == "cpu"
            and x.dim() in (2, 3) and x.is_contiguous()
            and not torch.is_grad_enabled() and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and not _exporting() and not _autocast_cpu()
            and not getattr(_module, "_global_forward_hooks", None)
            and not getattr(_module, "_global_forward_pre_hooks", None))


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _rows(t: Optional[torch.Tensor], units: torch.Tensor, hidden: int, gated: bool) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if gated:  # same units of the gate half and of the up half
        return torch.cat([t[units], t[hidden + units]], dim=0)
    return t[units]


class RegisterMlp(nn.Module):
    """An MLP split into its ordinary hidden units and a small register branch.

    out = fc2(act(fc1 x)) + reg_fc2(register_edit(act(reg_fc1 x)))
    The ordinary path is the original MLP minus the register units; the branch carries the register
    units, whose activations are moved onto the register tokens. `units` (buffer) keeps the original
    unit indices so the split can be described and undone.
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
        unit_idx = torch.tensor(sorted(units), dtype=torch.long, device=weights.fc2_weight.device)
        if len(unit_idx) == 0 or int(unit_idx.max()) >= hidden or int(unit_idx.min()) < 0:
            raise ValueError(f"register units {units} out of range for hidden width {hidden}")
        keep = torch.ones(hidden, dtype=torch.bool, device=unit_idx.device)
        keep[unit_idx] = False
        keep_idx = keep.nonzero().squeeze(1)
        rows_expected = hidden * (2 if weights.gated else 1)
        assert weights.fc1_weight.shape[0] == rows_expected, (weights.fc1_weight.shape, rows_expected)
        self.gated = weights.gated
        self.act = weights.act
        self.fc1 = _linear(_rows(weights.fc1_weight, keep_idx, hidden, self.gated), _rows(weights.fc1_bias, keep_idx, hidden, self.gated))
        self.fc2 = _linear(weights.fc2_weight[:, keep_idx], weights.fc2_bias)
        self.reg_fc1 = _linear(_rows(weights.fc1_weight, unit_idx, hidden, self.gated), _rows(weights.fc1_bias, unit_idx, hidden, self.gated))
        self.reg_fc2 = _linear(weights.fc2_weight[:, unit_idx], None)
        self.register_buffer("units", unit_idx)
        self.hidden_features = hidden
        self.num_prefix = int(num_prefix)
        self.num_registers = int(num_registers)
        self.scale = float(scale)
        self.per_neuron = bool(per_neuron)

    def _hidden(self, pre: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = pre.chunk(2, dim=-1)
            return self.act(gate) * up
        return self.act(pre)

    @torch.jit.unused
    def _ordinary_padded(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """fc2(act(fc1 x)) with fc1's output rows padded to _ALIGN floats, or None where not applicable."""
        fc1, fc2 = self.fc1, self.fc2
        n = fc1.weight.shape[0]
        if (not PAD_FC1_ROWS or n % _ALIGN == 0 or self.gated or not _elementwise(self.act) or not _plain_eager(x)
                or not _plain_linear(x, fc1) or not _plain_linear(x, fc2) or fc1.bias is None or fc2.bias is None):
            return None  # (without biases F.linear takes other kernels; not worth matching them bit for bit)
        x2 = x.reshape(-1, x.shape[-1])
        buf = torch.empty(x2.shape[0], n + (-n) % _ALIGN, dtype=x.dtype, device=x.device)
        torch.addmm(fc1.bias, x2, fc1.weight.t(), out=buf[:, :n])  # what F.linear runs for a 3-D input
        buf[:, n:].zero_()
        out = F.linear(self.act(buf)[:, :n], fc2.weight, fc2.bias)  # 2-D input: one addmm, as for 3-D
        return out.view(*x.shape[:-1], out.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: Optional[torch.Tensor] = None
        if not torch.jit.is_scripting():
            out = self._ordinary_padded(x)
        if out is None:
            out = self.fc2(self._hidden(self.fc1(x)))
        reg = self._hidden(self.reg_fc1(x))
        reg = register_edit(reg, self.num_prefix, self.num_registers, self.scale, self.per_neuron)
        return out + self.reg_fc2(reg)

    def merged_weights(self) -> MlpWeights:
        """The original (unsplit) MLP weights, for undoing the split."""
        hidden, units = self.hidden_features, self.units
        keep = torch.ones(hidden, dtype=torch.bool, device=units.device)
        keep[units] = False
        keep_idx = keep.nonzero().squeeze(1)
        order = torch.cat([keep_idx, units])
        inv = torch.empty_like(order)
        inv[order] = torch.arange(hidden, device=order.device)

        def merge_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            if self.gated:
                ag, au = a.chunk(2, 0)
                bg, bu = b.chunk(2, 0)
                return torch.cat([torch.cat([ag, bg])[inv], torch.cat([au, bu])[inv]])
            return torch.cat([a, b])[inv]

        fc1_b = merge_rows(self.fc1.bias, self.reg_fc1.bias) if self.fc1.bias is not None else None
        return MlpWeights(
            fc1_weight=merge_rows(self.fc1.weight, self.reg_fc1.weight),
            fc1_bias=fc1_b,
            fc2_weight=torch.cat([self.fc2.weight, self.reg_fc2.weight], dim=1)[:, inv],
            fc2_bias=self.fc2.bias,
            act=self.act,
            gated=self.gated,
        )

    def extra_repr(self) -> str:
        return (f"units={self.units.tolist()}, hidden={self.hidden_features}, gated={self.gated}, "
                f"num_prefix={self.num_prefix}, num_registers={self.num_registers}, scale={self.scale}, "
                f"per_neuron={self.per_neuron}")
