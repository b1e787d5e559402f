"""Library adapters: where a library keeps the blocks, the MLP units and the token layout.

An adapter answers those questions and nothing more; discovery, the hooked reference, baking and
parity are written once against this interface and take the adapter from their caller. Which adapter
fits a model is decided in one place, `surgery.backends.adapter_for(model)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .modules import MlpWeights, PrependRegisters


@dataclass
class AttentionParts:
    """What is needed to recompute a block's attention probabilities from its input residual."""

    norm: nn.Module
    q_weight: torch.Tensor
    q_bias: Optional[torch.Tensor]
    k_weight: torch.Tensor
    k_bias: Optional[torch.Tensor]
    num_heads: int
    q_norm: Optional[nn.Module] = None
    k_norm: Optional[nn.Module] = None

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities [B, heads, N, N] for residual input x [B, N, D]."""
        q, k = self.rotate(*self.heads(x))
        if k.shape[1] != q.shape[1]:  # grouped keys: each serves num_heads / kv_heads query heads
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries [B, heads, N, hd] and keys [B, kv_heads, N, hd] (normalised where the block does)."""
        y = self.norm(x)
        B, N, _ = y.shape
        q = torch.nn.functional.linear(y, self.q_weight, self.q_bias)
        k = torch.nn.functional.linear(y, self.k_weight, self.k_bias)
        hd = q.shape[-1] // self.num_heads
        q = q.reshape(B, N, self.num_heads, hd).transpose(1, 2)
        k = k.reshape(B, N, k.shape[-1] // hd, hd).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return q, k

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positional rotation of queries and keys (rotary embeddings); none here."""
        return q, k


class Adapter:
    """Base adapter. Subclasses implement the accessors for one library's module structure."""

    name: str = "base"
    # the register inserter put at `insertion_point`: a pre-norm takes one tensor; a wrapped transformer
    # layer (models without a pre-norm) needs PrependRegistersToLayer, which passes extra arguments on
    inserter: type[PrependRegisters] = PrependRegisters

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    # --- blocks and MLPs -------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        raise NotImplementedError

    def get_mlp(self, block: nn.Module) -> nn.Module:
        return block.mlp

    def set_mlp(self, block: nn.Module, mlp: nn.Module) -> None:
        block.mlp = mlp

    def mlp_weights(self, mlp: nn.Module) -> MlpWeights:
        raise NotImplementedError

    def make_mlp(self, weights: MlpWeights) -> nn.Module:
        """This library's own MLP module holding `weights` (used to undo a split)."""
        raise NotImplementedError

    def down_proj(self, mlp: nn.Module) -> nn.Module:
        """The module whose input is the post-activation hidden layer (register neurons are its inputs)."""
        raise NotImplementedError

    def mlp_width(self, block: nn.Module) -> int:
        """Units of the block's MLP hidden layer (where register neurons live; not the residual width)."""
        mlp = self.get_mlp(block)
        if hasattr(mlp, "hidden_features") and hasattr(mlp, "reg_fc2"):
            return int(mlp.hidden_features)
        return int(self.down_proj(mlp).weight.shape[1])

    # --- token layout ----------------------------------------------------------------------
    def num_prefix_tokens(self, model: nn.Module) -> int:
        """Tokens before the patches (CLS, trained registers); test-time registers go right after them."""
        raise NotImplementedError

    def set_num_prefix_tokens(self, model: nn.Module, n: int) -> None:
        """Tell the model (pooling, token slicing) that n tokens precede the patches."""

    def insertion_point(self, model: nn.Module) -> tuple[nn.Module, str]:
        """(parent, attribute) of the module that registers enter: the pre-norm, or the last embedding op."""
        raise NotImplementedError

    def embed_dim(self, model: nn.Module) -> int:
        raise NotImplementedError

    def attention(self, block: nn.Module) -> AttentionParts:
        raise NotImplementedError

    def patch_embed(self, model: nn.Module) -> nn.Conv2d:
        raise NotImplementedError

    def block_output(self, output: object) -> torch.Tensor:
        """Residual stream from a block's forward output (some libraries return tuples)."""
        return output[0] if isinstance(output, (tuple, list)) else output  # type: ignore[index]

    # --- running the model -----------------------------------------------------------------
    def forward_tokens(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Final normalised token features [B, N, D] (registers included when present)."""
        raise NotImplementedError

    def forward_pooled(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """The model's pooled image embedding [B, E]."""
        raise NotImplementedError

    def forward_both(self, model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_pooled(model, pixels), self.forward_tokens(model, pixels)

    def forward_effect(self, model: nn.Module, pixels: torch.Tensor) -> None:
        """The pass the effect statistics watch (hooks on the blocks): the whole forward (a VLM: its tower)."""
        self.forward_both(model, pixels)

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        raise NotImplementedError

    def data_transform(self, model: nn.Module) -> Callable:
        raise NotImplementedError
