"""Vision Transformer with baked test-time registers (written by vit-surgery; needs only torch + transformers).

Load with `AutoModel.from_pretrained(DIR, trust_remote_code=True)`. The classes below are the stock
transformers classes with two structural changes, described by the `vit_surgery` block of config.json:

- R register tokens (a `register_tokens` buffer, zeros) are inserted right after the prefix tokens at
  the input of CLIP's `pre_layrnorm`, or at the end of DINOv2's embeddings;
- in the listed blocks the MLP is split into its ordinary units and a small branch holding the register
  neurons; the branch moves those units' activations onto the register tokens (register rows get the
  signed maximum over all tokens, patch rows 0, the CLS row is unchanged).

Outputs are the usual transformers output objects. Token layout of `last_hidden_state` (and of every
entry of `hidden_states`):

    [CLS, trained registers (Dinov2WithRegisters only), R test-time registers, patches]

The test-time registers sit at `config.vit_surgery["register_indices"]`; patch tokens are
`last_hidden_state[:, model.num_prefix_tokens:]` (model.num_prefix_tokens counts CLS, trained and
test-time registers). `pooler_output` / `image_embeds` are computed from the CLS token exactly as in the
stock model. Note that stock heads which slice `last_hidden_state[:, 1:]` as patches would include the
registers; use `model.patch_tokens(last_hidden_state)` instead.
"""
from __future__ import annotations

import torch
import transformers
from torch import nn


def register_rows(h, num_prefix: int, num_registers: int, scale: float = 1.0, per_neuron: bool = False):
    """Prefix rows unchanged, register rows <- scale * signed max (largest |.| over tokens, and units unless
    per_neuron), one max per image; [B, num_prefix + num_registers, k]. Patch rows of the edit are 0."""
    B, N, k = h.shape
    if per_neuron:
        idx = h.abs().argmax(dim=1, keepdim=True)
        m = h.gather(1, idx)
    else:
        flat = h.reshape(B, N * k)
        idx = flat.abs().argmax(dim=1, keepdim=True)
        m = flat.gather(1, idx).reshape(B, 1, 1).expand(B, 1, k)
    reg = (m * scale).expand(B, num_registers, k)
    return torch.cat([h[:, :num_prefix], reg], dim=1)  # the patch rows of the edit are all zero


class PrependRegisters(nn.Module):
    """Inserts the register tokens after the prefix tokens, then applies the wrapped module."""

    def __init__(self, inner: nn.Module, num_registers: int, embed_dim: int, num_prefix: int) -> None:
        super().__init__()
        self.inner = inner
        self.num_prefix = int(num_prefix)
        self.num_registers = int(num_registers)
        self.register_buffer("register_tokens", torch.zeros(1, num_registers, embed_dim))

    def forward(self, x, *args, **kwargs):
        reg = self.register_tokens.to(x.dtype).expand(x.shape[0], -1, -1)
        p = self.num_prefix
        return self.inner(torch.cat([x[:, :p], reg, x[:, p:]], dim=1), *args, **kwargs)


class RegisterMlp(nn.Module):
    """out = fc2(act(fc1 x)) + reg_fc2(register_edit(act(reg_fc1 x))); gated MLPs pack [gate; up] rows."""

    def __init__(self, dim: int, hidden: int, out_dim: int, num_units: int, act: nn.Module, gated: bool,
                 fc1_bias: bool, fc2_bias: bool, num_prefix: int, num_registers: int, scale: float,
                 per_neuron: bool) -> None:
        super().__init__()
        m = 2 if gated else 1
        self.gated = gated
        self.act = act
        # the ordinary MLP keeps its shape; the register units' rows/columns are zero in it
        self.fc1 = nn.Linear(dim, hidden * m, bias=fc1_bias)
        self.fc2 = nn.Linear(hidden, out_dim, bias=fc2_bias)
        self.reg_fc1 = nn.Linear(dim, num_units * m, bias=fc1_bias)
        self.reg_fc2 = nn.Linear(num_units, out_dim, bias=False)
        self.register_buffer("units", torch.zeros(num_units, dtype=torch.long))
        self.hidden_features = hidden
        self.num_prefix = int(num_prefix)
        self.num_registers = int(num_registers)
        self.scale = float(scale)
        self.per_neuron = bool(per_neuron)

    def _hidden(self, pre):
        if self.gated:
            gate, up = pre.chunk(2, dim=-1)
            return self.act(gate) * up
        return self.act(pre)

    def forward(self, x):
        out = self.fc2(self._hidden(self.fc1(x)))
        head = self.reg_fc2(register_rows(self._hidden(self.reg_fc1(x)), self.num_prefix, self.num_registers,
                                          self.scale, self.per_neuron))
        q = head.shape[1]
        return torch.cat([out[:, :q] + head, out[:, q:]], dim=1)


def _split_mlp(old: nn.Module, num_units: int, p: int, recipe: dict) -> RegisterMlp:
    if all(hasattr(old, n) for n in ("gate_proj", "up_proj", "down_proj")):  # DINOv2 SwiGLU
        first, down, act, gated = old.gate_proj, old.down_proj, old.act_fn, True
    elif all(hasattr(old, n) for n in ("up_proj", "down_proj", "act_fn")):  # DINOv3 plain MLP
        first, down, act, gated = old.up_proj, old.down_proj, old.act_fn, False
    elif hasattr(old, "weights_in"):  # packed SwiGLU (older transformers)
        first, down, act, gated = old.weights_in, old.weights_out, nn.SiLU(), True
    else:
        first, down, act, gated = old.fc1, old.fc2, old.activation_fn, False
    hidden = down.in_features
    return RegisterMlp(first.in_features, hidden, down.out_features, num_units, act, gated,
                       first.bias is not None, down.bias is not None, p, int(recipe.get("num_registers", 1)),
                       float(recipe.get("scale", 1.0)), recipe.get("mode", "shared") == "per_neuron")


def bake_structure(model: nn.Module, vision: nn.Module, blocks, parent: nn.Module, attr: str, embed_dim: int,
                   spec: dict) -> None:
    """Turn a freshly built stock model into the baked structure described by config.vit_surgery."""
    recipe = spec["recipe"]
    p = int(spec["num_prefix_tokens"])
    R = int(recipe.get("num_registers", 1))
    for layer, units in recipe["register_neurons"].items():
        block = blocks[int(layer)]
        block.mlp = _split_mlp(block.mlp, len(units), p, recipe)
    setattr(parent, attr, PrependRegisters(getattr(parent, attr), R, embed_dim, p))
    vision.num_prefix_tokens = p + R
    model.num_prefix_tokens = p + R
    model.register_token_indices = list(range(p, p + R))


class _PatchTokensMixin:
    def patch_tokens(self, hidden_state):
        """Patch tokens of `last_hidden_state` (or a `hidden_states` entry): CLS and registers skipped."""
        return hidden_state[:, self.num_prefix_tokens:]


class VitSurgeryCLIPVisionModel(_PatchTokensMixin, transformers.CLIPVisionModel):
    def __init__(self, config):
        super().__init__(config)
        v = getattr(self, "vision_model", self)  # transformers 4.x wraps a CLIPVisionTransformer
        bake_structure(self, v, v.encoder.layers, v, "pre_layrnorm", config.hidden_size, config.vit_surgery)


class VitSurgeryCLIPVisionModelWithProjection(_PatchTokensMixin, transformers.CLIPVisionModelWithProjection):
    def __init__(self, config):
        super().__init__(config)
        v = self.vision_model
        bake_structure(self, v, v.encoder.layers, v, "pre_layrnorm", config.hidden_size, config.vit_surgery)


class VitSurgeryCLIPModel(_PatchTokensMixin, transformers.CLIPModel):
    def __init__(self, config):
        super().__init__(config)
        v = self.vision_model
        bake_structure(self, v, v.encoder.layers, v, "pre_layrnorm", config.vision_config.hidden_size,
                       config.vit_surgery)


class VitSurgeryDinov2Model(_PatchTokensMixin, transformers.Dinov2Model):
    def __init__(self, config):
        super().__init__(config)
        bake_structure(self, self, self.encoder.layer, self.embeddings, "dropout", config.hidden_size,
                       config.vit_surgery)


class VitSurgeryDinov2WithRegistersModel(_PatchTokensMixin, transformers.Dinov2WithRegistersModel):
    def __init__(self, config):
        super().__init__(config)
        bake_structure(self, self, self.encoder.layer, self.embeddings, "dropout", config.hidden_size,
                       config.vit_surgery)


class VitSurgeryDINOv3ViTModel(_PatchTokensMixin, transformers.DINOv3ViTModel):
    """Registers enter at the input of the first layer (HF DINOv3 has no pre-norm); HF's rotary code rotates
    only the last (patch) tokens, so the test-time register gets no rotary position, like CLS and the
    trained registers."""

    def __init__(self, config):
        super().__init__(config)
        bake_structure(self, self, list(self.model.layer), self.model.layer, "0", config.hidden_size,
                       config.vit_surgery)


class VitSurgerySiglipVisionModel(_PatchTokensMixin, transformers.SiglipVisionModel):
    """No CLS token: the register is token 0; the attention-pool head (`pooler_output`) attends over every
    token, the register included."""

    def __init__(self, config):
        super().__init__(config)
        v = getattr(self, "vision_model", self)
        bake_structure(self, v, list(v.encoder.layers), v.encoder.layers, "0", config.hidden_size,
                       config.vit_surgery)
