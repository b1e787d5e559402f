"""VLM vision encoders (`vision_encoder.onnx`, as onnx-community / transformers.js ship them): the image
features a language model reads must keep the source's token count, so the registers leave the output.

Such a graph is recognised by its output `image_features` (the name VLM pipelines read from the vision
encoder: one row per `<image>` placeholder). It is a ViT whose blocks feed a feature selection (a hidden
state of `vision_feature_layer`, possibly an intermediate block, several concatenated on the feature axis;
strategy `default` drops CLS with a token slice starting at the prefix count) and the multimodal
projector, token by token. The bake inserts the registers after the prefix tokens as for any ViT; then:
- strategy `default`: the CLS-dropping slice starts after the registers (the bake's token-slice shift),
  so the output already has the source's count;
- strategy `full` (CLS kept, or a tower without CLS): the output rows at the register positions
  [prefix, prefix + R) are removed at the output (the projector works token by token, so row order is the
  tower's). Which outputs need it is measured: each output's token count after the bake (onnxruntime,
  batch 2) against the source's; any other difference is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from ..core.errors import ModelInputError

IMAGE_FEATURES = "image_features"
INT64_MAX = np.iinfo(np.int64).max


def is_vision_encoder(model: ir.Model) -> bool:
    return any(o.name == IMAGE_FEATURES for o in model.graph.outputs)


@dataclass
class SourceOutput:
    tokens: int  # size of axis 1 at batch 2
    shape: Any  # the declared ir.Shape (may be None)
    type: Any


def _token_counts(model: ir.Model, input_size: tuple[int, int, int], label: str) -> dict[str, int]:
    from .runtime import ExposedSession

    sess = ExposedSession(model, [], label)
    try:
        got, _ = sess.run(np.zeros((2, *input_size), dtype=np.float32))
    finally:
        sess.close()
    return {n: (int(a.shape[1]) if a.ndim >= 2 else -1) for n, a in zip(sess.output_names, got)}


def source_outputs(model: ir.Model, input_size: tuple[int, int, int], label: str) -> dict[str, SourceOutput]:
    """Each output's token count, declared shape and type, before the rewrite."""
    counts = _token_counts(model, input_size, label)
    return {o.name: SourceOutput(counts[o.name], o.shape, o.type) for o in model.graph.outputs}


def drop_register_rows(b: Any, model: ir.Model, source: dict[str, SourceOutput], input_size: tuple[int, int, int],
                       p: int, R: int, label: str) -> list[str]:
    """After the rewrite (graph sorted): every output with R more tokens than the source loses rows
    [p, p + R); its name, declared shape and type become the source's. `b` is the bake's node builder."""
    counts = _token_counts(model, input_size, f"{label} (registers inserted)")
    graph = model.graph
    done = []
    for i, out in enumerate(list(graph.outputs)):
        was = source[out.name]
        n = counts[out.name]
        if n == was.tokens:
            continue
        if n != was.tokens + R:
            raise ModelInputError(f"{label}: output '{out.name}' has {n} tokens with the registers, the source "
                                  f"{was.tokens}: cannot tell which rows are the registers")
        axis = b.i64("axis1", [1])
        parts = [b.op("Slice", [out, b.i64("start", [p + R]), b.i64("end", [INT64_MAX]), axis])]
        if p:
            parts.insert(0, b.op("Slice", [out, b.i64("start", [0]), b.i64("end", [p]), axis]))
        new = b.op("Concat", parts, {"axis": 1}) if len(parts) > 1 else parts[0]
        name = out.name
        out.name = f"{name}_with_registers"
        new.name, new.shape, new.type = name, was.shape, was.type
        graph.outputs[i] = new
        done.append(f"output '{name}': register row(s) {p}..{p + R - 1} removed (the source's {was.tokens} "
                    "tokens for the language model)")
    return done
