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


# The core modules (surgery/core/modules.py: register_rows, PrependRegisters, RegisterMlp ...). The writer
# (surgery/backends/hf/writer.py) replaces the import line below by that file's source, so the written modeling file is
# standalone (torch + transformers) and holds the very code vit-surgery bakes and checks with: one copy.
from surgery.core.modules import MlpWeights, PrependRegisters, PrependRegistersToLayer, RegisterMlp  # vit-surgery: inline
from surgery.core.image_features import drop_registers_from_outputs  # vit-surgery: inline
from surgery.backends.hf.stock_refusal import mark_stock_refusal, without_stock_refusal  # vit-surgery: inline


def refusing_config(stock: type) -> type:
    """`stock` (a transformers config class) reading and writing config.json with the stock-refusal marker of
    stock_refusal.py: taken out when built (the stock __init__ never sees it), put back when serialised (a
    re-saved model stays closed to the stock classes)."""

    class Config(stock):
        def __init__(self, **kwargs):
            super().__init__(**without_stock_refusal(kwargs))

        def to_dict(self):
            return mark_stock_refusal(super().to_dict())

        def to_diff_dict(self):
            return mark_stock_refusal(super().to_diff_dict())

    Config.__name__ = Config.__qualname__ = f"VitSurgery{stock.__name__}"
    return Config


VitSurgeryCLIPVisionConfig = refusing_config(transformers.CLIPVisionConfig)
VitSurgeryCLIPConfig = refusing_config(transformers.CLIPConfig)
VitSurgeryDinov2Config = refusing_config(transformers.Dinov2Config)
VitSurgeryDinov2WithRegistersConfig = refusing_config(transformers.Dinov2WithRegistersConfig)
VitSurgeryDINOv3ViTConfig = refusing_config(transformers.DINOv3ViTConfig)
VitSurgerySiglipVisionConfig = refusing_config(transformers.SiglipVisionConfig)
VitSurgeryLlavaConfig = refusing_config(transformers.LlavaConfig)
VitSurgeryLlavaNextConfig = refusing_config(transformers.LlavaNextConfig)
VitSurgeryLlavaOnevisionConfig = refusing_config(transformers.LlavaOnevisionConfig)
VitSurgeryPaliGemmaConfig = refusing_config(transformers.PaliGemmaConfig)


def _mlp_weights(old: nn.Module) -> MlpWeights:
    """The stock MLP's weights in the core's canonical view (gated MLPs: [gate; up] rows), as the
    vit-surgery adapters read them when baking; on the meta device these are shapes only."""
    if all(hasattr(old, n) for n in ("gate_proj", "up_proj", "down_proj")):  # DINOv2 / DINOv3 SwiGLU
        g, u, down = old.gate_proj, old.up_proj, old.down_proj
        bias = None if g.bias is None else torch.cat([g.bias, u.bias])
        return MlpWeights(torch.cat([g.weight, u.weight]), bias, down.weight, down.bias, old.act_fn, gated=True)
    if all(hasattr(old, n) for n in ("up_proj", "down_proj", "act_fn")):  # DINOv3 plain MLP
        return MlpWeights(old.up_proj.weight, old.up_proj.bias, old.down_proj.weight, old.down_proj.bias, old.act_fn)
    if hasattr(old, "weights_in"):  # packed SwiGLU (older transformers)
        return MlpWeights(old.weights_in.weight, old.weights_in.bias, old.weights_out.weight, old.weights_out.bias,
                          nn.SiLU(), gated=True)
    return MlpWeights(old.fc1.weight, old.fc1.bias, old.fc2.weight, old.fc2.bias, old.activation_fn)


def _split_mlp(old: nn.Module, units: list, p: int, recipe: dict) -> RegisterMlp:
    return RegisterMlp(_mlp_weights(old), [int(u) for u in units], p, int(recipe.get("num_registers", 1)),
                       float(recipe.get("scale", 1.0)), recipe.get("mode", "shared") == "per_neuron")


def bake_structure(model: nn.Module, vision: nn.Module, blocks, parent: nn.Module, attr: str, embed_dim: int,
                   spec: dict, inserter: type = PrependRegisters) -> None:
    """Turn a freshly built stock model into the baked structure described by config.vit_surgery
    (`inserter`: PrependRegistersToLayer where registers enter at a transformer layer, not a pre-norm)."""
    recipe = spec["recipe"]
    p = int(spec["num_prefix_tokens"])
    R = int(recipe.get("num_registers", 1))
    for layer, units in recipe["register_neurons"].items():
        block = blocks[int(layer)]
        block.mlp = _split_mlp(block.mlp, units, p, recipe)
    setattr(parent, attr, inserter(getattr(parent, attr), R, embed_dim, p))
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
                       config.vit_surgery, PrependRegistersToLayer)


class VitSurgerySiglipVisionModel(_PatchTokensMixin, transformers.SiglipVisionModel):
    """No CLS token: the register is token 0; the attention-pool head (`pooler_output`) attends over every
    token, the register included."""

    def __init__(self, config):
        super().__init__(config)
        v = getattr(self, "vision_model", self)
        bake_structure(self, v, list(v.encoder.layers), v.encoder.layers, "0", config.hidden_size,
                       config.vit_surgery, PrependRegistersToLayer)


# ---- vision-language models: only the vision tower is baked ----------------------------------------

def bake_vlm_tower(tower: nn.Module, spec: dict) -> None:
    """Bake the VLM's vision tower (CLIP: registers enter `pre_layrnorm`; SigLIP: the first layer) and give it
    the class that leaves the register rows out of its outputs (`RegisterDropping<tower class>`, no hook), so
    the VLM selects the same image features as before."""
    v = getattr(tower, "vision_model", tower)
    if hasattr(v, "pre_layrnorm"):
        bake_structure(tower, v, v.encoder.layers, v, "pre_layrnorm", tower.config.hidden_size, spec)
    else:
        bake_structure(tower, v, list(v.encoder.layers), v.encoder.layers, "0", tower.config.hidden_size, spec,
                       PrependRegistersToLayer)
    drop_registers_from_outputs(v, int(spec["num_prefix_tokens"]))


class VitSurgeryLlavaForConditionalGeneration(transformers.LlavaForConditionalGeneration):
    """LLaVA whose vision tower carries baked test-time registers; image features, placeholders, processor
    and language model are as in the stock model."""

    def __init__(self, config):
        super().__init__(config)
        bake_vlm_tower(self.model.vision_tower, config.vit_surgery)


class VitSurgeryLlavaNextForConditionalGeneration(transformers.LlavaNextForConditionalGeneration):
    """LLaVA-NeXT whose vision tower carries baked test-time registers (every any-resolution tile passes
    through the baked tower; the tiles' features are selected and packed as in the stock model)."""

    def __init__(self, config):
        super().__init__(config)
        bake_vlm_tower(self.model.vision_tower, config.vit_surgery)


class VitSurgeryLlavaOnevisionForConditionalGeneration(transformers.LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision whose vision tower carries baked test-time registers (tiles as in LLaVA-NeXT)."""

    def __init__(self, config):
        super().__init__(config)
        bake_vlm_tower(self.model.vision_tower, config.vit_surgery)


class VitSurgeryPaliGemmaForConditionalGeneration(transformers.PaliGemmaForConditionalGeneration):
    """PaliGemma whose SigLIP tower carries baked test-time registers (removed from its last_hidden_state
    before the projector)."""

    def __init__(self, config):
        super().__init__(config)
        bake_vlm_tower(self.model.vision_tower, config.vit_surgery)


def _keep_checkpoint_names(remote: type) -> None:
    """The folder keeps its source's tensor names (the hub's legacy `language_model.model.*`,
    `vision_tower.vision_model.*`, or transformers' own): transformers renames them at load for its stock
    class only, so the stock class's renaming rules are registered for this remote-code class too."""
    try:
        from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                     register_checkpoint_conversion_mapping)
    except ImportError:  # transformers 4.x: no conversion mapping (its classes load the legacy names)
        return
    mapping = get_checkpoint_conversion_mapping(remote.config_class.model_type)
    if mapping:
        register_checkpoint_conversion_mapping(remote.__name__, mapping, overwrite=True)


for _vlm in (VitSurgeryLlavaForConditionalGeneration, VitSurgeryLlavaNextForConditionalGeneration,
             VitSurgeryLlavaOnevisionForConditionalGeneration, VitSurgeryPaliGemmaForConditionalGeneration):
    _keep_checkpoint_names(_vlm)


# each model class builds its folder's config with the remote config class (the stock one refuses it)
for _model_class in (VitSurgeryCLIPVisionModel, VitSurgeryCLIPVisionModelWithProjection, VitSurgeryCLIPModel,
                     VitSurgeryDinov2Model, VitSurgeryDinov2WithRegistersModel, VitSurgeryDINOv3ViTModel,
                     VitSurgerySiglipVisionModel, VitSurgeryLlavaForConditionalGeneration,
                     VitSurgeryLlavaNextForConditionalGeneration, VitSurgeryLlavaOnevisionForConditionalGeneration,
                     VitSurgeryPaliGemmaForConditionalGeneration):
    _model_class.config_class = globals()[f"VitSurgery{_model_class.config_class.__name__}"]
