"""Constants and labels of onnx-ir graph values (shared by recognition, weights and the rewrite)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx_ir as ir


def node_label(node: Optional[ir.Node]) -> str:
    if node is None:
        return "<graph input>"
    dom = f"{node.domain}." if node.domain not in ("", "ai.onnx") else ""
    return f"'{node.name}' ({dom}{node.op_type})"


def const_array(v: Optional[ir.Value]) -> Optional[np.ndarray]:
    """The value of a constant tensor: an initializer, a Constant node, or those through Identity."""
    if v is None:
        return None
    t = ir.convenience.get_const_tensor(v)
    if t is not None:
        return t.numpy()
    p = v.producer()
    if p is not None and p.op_type == "Identity" and p.domain in ("", "ai.onnx"):
        return const_array(p.inputs[0])
    return None


def is_const(v: Optional[ir.Value]) -> bool:
    return v is None or const_array(v) is not None


PASS_THROUGH = frozenset({"Identity", "Cast"})  # ops that copy a tensor (Cast: in another precision)


def copies_chain(v: ir.Value) -> list[ir.Value]:
    """`v` and the tensors it is a copy of, walking back through standard Identity / Cast nodes; the last
    one is the original."""
    chain = [v]
    while ((p := chain[-1].producer()) is not None and p.op_type in PASS_THROUGH and p.domain in ("", "ai.onnx")
           and p.inputs and p.inputs[0] is not None):
        chain.append(p.inputs[0])
    return chain
