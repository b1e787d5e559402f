"""What the model needs while torch exports it (optimum's model_patcher): a float32 interface around
`forward_both`, the MHA fast path off, TF32 off while PyTorch outputs serve as references, and the register
branch in float64.

Numerics of the register token. On an image without outliers the register neurons' signed max lies in
the activation's far negative tail (GELU(-4) ~ -1e-4), where float32 activation kernels disagree by
1e-4 to 1e-2 relative (onnxruntime's sigmoid and PyTorch's CPU erf are approximations accurate in
absolute, not relative terms). So the exported graph computes the register branch (the k register
units only: reg_fc1 output -> activation -> edit) in float64 whenever onnxruntime has float64 kernels
for the activation (probed once per activation type; exact GELU's Erf has none, and stays float32).
The PyTorch model is unchanged.
"""
from __future__ import annotations

import contextlib
import copy
import io
import warnings
from typing import Any, Iterator

import torch
from torch import nn


class _ExportWrapper(nn.Module):
    """family.forward_both as a module with a float32 interface (fp16 exports cast inside the graph)."""

    def __init__(self, model: nn.Module, family: Any, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.dtype = dtype

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, tokens = self.family.forward_both(self.model, pixel_values.to(self.dtype))
        return pooled.float(), tokens.float()


class _CastOutput(nn.Module):
    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).to(self.dtype)


class _CastInput(nn.Module):
    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.dtype))


_F64_SUPPORT: dict[str, bool] = {}


def _ort_runs_float64(act: nn.Module) -> bool:
    """Does onnxruntime (CPU, optimisation ALL) have float64 kernels for this activation's ops?"""
    key = f"{type(act).__module__}.{type(act).__qualname__}({act.extra_repr()})"
    if key in _F64_SUPPORT:
        return _F64_SUPPORT[key]

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = copy.deepcopy(act).cpu()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(x.double()).float()

    ok = False
    try:
        import numpy as np
        import onnxruntime as ort

        buf = io.BytesIO()
        x = torch.linspace(-6, 6, 24).reshape(2, 3, 4)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(Probe().eval(), (x,), buf, input_names=["x"], output_names=["y"], opset_version=17,
                              dynamo=False)
            want = Probe()(x).numpy()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 4
        sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
        got = sess.run(None, {"x": x.numpy()})[0]
        ok = bool(np.allclose(got, want, rtol=1e-6, atol=1e-30))
    except Exception:  # no float64 kernel (Erf), not exportable alone, ...: keep the branch in float32
        ok = False
    _F64_SUPPORT[key] = ok
    return ok


@contextlib.contextmanager
def _float64_register_branch(model: nn.Module) -> Iterator[list[str]]:
    """Within the context, every RegisterMlp computes its register branch (activation + edit of the k
    register units) in float64: reg_fc1's output is cast up, reg_fc2's input cast back. Yields the
    names of the MLPs changed; MLPs whose activation onnxruntime cannot run in float64 are left alone."""
    from surgery.core.modules import RegisterMlp

    changed: list[tuple[RegisterMlp, nn.Module, nn.Module]] = []
    try:
        for name, mod in model.named_modules():
            if isinstance(mod, RegisterMlp) and _ort_runs_float64(mod.act):
                dtype = mod.reg_fc2.weight.dtype
                changed.append((mod, mod.reg_fc1, mod.reg_fc2))
                mod.reg_fc1 = _CastOutput(mod.reg_fc1, torch.float64)
                mod.reg_fc2 = _CastInput(mod.reg_fc2, dtype)
                mod._vit_surgery_name = name
        yield [m._vit_surgery_name for m, _, _ in changed]
    finally:
        for mod, fc1, fc2 in changed:
            mod.reg_fc1, mod.reg_fc2 = fc1, fc2
            mod.__dict__.pop("_vit_surgery_name", None)


# ---- small helpers -----------------------------------------------------------------------------

@contextlib.contextmanager
def _mha_fastpath_disabled() -> Iterator[None]:
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
def _exact_torch() -> Iterator[None]:
    """No TF32 on CUDA while PyTorch outputs serve as references."""
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c


