"""The exported graph's interface, declared once (optimum's OnnxConfig): inputs, outputs, dynamic axes,
opset, exporters.

Graph interface (`VIT_ONNX_SPEC`):
  input  pixel_values  float32 [batch, 3, H, W]    (preprocessed as the model's own transform does)
  output pooled        float32 [batch, E]          (the family's pooled embedding / head output)
  output tokens        float32 [batch, N, D]       (final normalised tokens, register tokens included)
Only the batch axis is dynamic. An `--fp16` export computes in float16 inside the graph but keeps this
float32 interface. Weights go to `model.onnx.data` (external data) when they would push the protobuf
past its 2 GB limit.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("vit-surgery")

# (file names, metadata keys and tolerances: the on-disk format, surgery/core/output_format.py)
# Protobuf cannot serialise a message of 2 GiB or more; weights above this go to external data.
EXTERNAL_DATA_THRESHOLD = 2**31 - 64 * 2**20
EXPORTERS = ("dynamo", "legacy")


# ---- the graph interface, declared once ----------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, axis names, which axes are dynamic, what it holds."""

    name: str
    axes: tuple[str, ...]
    dynamic: tuple[int, ...] = (0,)
    doc: str = ""


@dataclass(frozen=True)
class OnnxSpec:
    """Inputs, outputs, dynamic axes and opset of the exported graph (optimum-style export config)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int = 18
    export_batch_size: int = 2  # never 1: exporters may specialise a batch of 1 into the graph

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """For the TorchScript (legacy) exporter."""
        return {t.name: {i: t.axes[i] for i in t.dynamic} for t in self.inputs + self.outputs}

    def dynamic_shapes(self) -> dict[str, dict[int, Any]]:
        """For the torch.export (dynamo) exporter: one Dim per axis name, shared by every tensor."""
        dims: dict[str, Any] = {}
        out: dict[str, dict[int, Any]] = {}
        for t in self.inputs:
            out[t.name] = {}
            for i in t.dynamic:
                name = t.axes[i]
                dims.setdefault(name, torch.export.Dim(name, min=1))
                out[t.name][i] = dims[name]
        return out

    def describe(self) -> dict[str, Any]:
        return {"inputs": {t.name: {"axes": list(t.axes), "dynamic": list(t.dynamic), "doc": t.doc}
                           for t in self.inputs},
                "outputs": {t.name: {"axes": list(t.axes), "dynamic": list(t.dynamic), "doc": t.doc}
                            for t in self.outputs}}


VIT_ONNX_SPEC = OnnxSpec(
    inputs=(TensorSpec("pixel_values", ("batch", "channels", "height", "width"),
                       doc="float32 images, preprocessed with the model's own transform"),),
    outputs=(TensorSpec("pooled", ("batch", "embed"), doc="pooled image embedding (head output)"),
             TensorSpec("tokens", ("batch", "sequence", "width"),
                        doc="final normalised token features: [prefix | test-time registers | patches]")),
)
