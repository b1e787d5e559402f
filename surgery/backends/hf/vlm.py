"""HF transformers vision-language models (LLaVA family): the vision tower is what vit-surgery edits.

`LlavaForConditionalGeneration` keeps its tower at `model.vision_tower` (a stock `CLIPVisionModel`
or `SiglipVisionModel`), the projector at `model.multi_modal_projector` and the language model at
`model.language_model` + `lm_head`. The adapter below hands every tower question (blocks, MLPs,
insertion point, prefix count, attention) to the tower's own adapter (HF_CLIP / HF_SIGLIP) applied
to the tower, so discovery, the hooked reference, baking and the judge run on the tower alone, with
the VLM's own image processor.

What the VLM adds:
- the tower drops the register rows from its outputs (its class becomes `RegisterDropping<tower class>`,
  surgery/core/image_features.py: a module of the graph, no hook), so the VLM's
  position-based feature selection (`hidden_states[vision_feature_layer]`, strategy `default` drops
  index 0, `full` keeps every token) sees exactly the tokens it sees without registers, and the
  number of image features (= `<image>` placeholders) is unchanged;
- the judged outputs are the projector's input features (`image_features`) and the language model's
  logits on the image followed by a fixed text (`logits`), not the tower's tokens and pooled vector.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ...core.adapter import Adapter, AttentionParts
from ...core.image_features import NATIVE_PREFIX_ATTR, drop_registers_from_outputs
from ...core.modules import MlpWeights
from .adapter import HF_CLIP, PREPROCESS_ATTR
from .dinov3_siglip import HF_SIGLIP
from .family import ORGANISMS, Organism, from_transformers, hf_family, transformers_classes, vlm_families
from .vlm_stream import streamed_checkpoint

IMAGE_PROCESSOR_ATTR = "surgery_image_processor"  # the VLM's own HF image processor (set by the loader)
SELECT_STRATEGIES = ("default", "full")
TEXT_LENGTH = 8  # text tokens after the image in the judged prompt
# A streamed language model (a VLM read from safetensors) gets the logits of as many images of a batch as
# this much work allows (language-model parameters x prompt tokens, per pass), at least one: every image
# is judged on its image features, a 7B's logits on one image per batch (each pass reads the whole model).
LM_WORK_PER_BATCH = 2e12


def logits_images(model: nn.Module, batch: int, tokens: int) -> int:
    """How many images of a batch the judged logits cover (all, unless the language model is streamed)."""
    ckpt = streamed_checkpoint(model)
    if ckpt is None:
        return batch
    return max(1, min(batch, int(LM_WORK_PER_BATCH // max(1, ckpt.lm_parameters() * tokens))))


def vision_tower(model: nn.Module) -> nn.Module:
    return model.model.vision_tower


def feature_selection(model: nn.Module) -> tuple[Any, str]:
    """(vision_feature_layer, vision_feature_select_strategy) the VLM's config says; a VLM without them
    (PaliGemma) takes the tower's last_hidden_state, every token."""
    cfg = model.config
    return getattr(cfg, "vision_feature_layer", "last_hidden_state"), getattr(cfg, "vision_feature_select_strategy",
                                                                             "full")


class ProcessorTransform:
    """PIL image -> pixel tensor [3, H, W] through the VLM's own HF image processor."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def __call__(self, image: Any) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0].to(torch.float32)


LLAVA = ORGANISMS + "vlm:build_llava_organism"
LLAVA_NEXT = ORGANISMS + "vlm:build_llava_next_organism"


@hf_family(model_types={"llava": "LlavaForConditionalGeneration"},
           towers={"hf_llava_clip": (HF_CLIP, Organism(LLAVA)),
                   "hf_llava_siglip": (HF_SIGLIP, Organism(LLAVA, {"tower": "siglip", "strategy": "full"}))})
class HFVisionLanguage(Adapter):
    """A LLaVA-style VLM whose tower is handled by `tower_adapter` (an HF vision adapter); its classes are
    its family record's (`@hf_family`)."""

    output_names = ("image_features", "logits")  # what the judge calls forward_both's two outputs
    text_length = TEXT_LENGTH  # the judged prompt: the image's placeholders, then this many text tokens

    def __init__(self, tower_adapter: Adapter, name: str) -> None:
        self.tower_adapter, self.name = tower_adapter, name
        self.inserter = tower_adapter.inserter  # SigLIP towers: registers enter at a transformer layer

    def matches(self, model: nn.Module) -> bool:
        if not from_transformers(model):
            return False
        try:
            classes = transformers_classes(*type(self).family.stock_classes)  # type: ignore[attr-defined]
        except ImportError:
            return False
        return bool(classes) and isinstance(model, classes) and self.tower_adapter.matches(vision_tower(model))

    # --- the tower's structure, answered by the tower's adapter ---------------------------------
    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return self.tower_adapter.blocks(vision_tower(model))

    def get_mlp(self, block: nn.Module) -> nn.Module:
        return self.tower_adapter.get_mlp(block)

    def set_mlp(self, block: nn.Module, mlp: nn.Module) -> None:
        self.tower_adapter.set_mlp(block, mlp)

    def mlp_weights(self, mlp: nn.Module) -> MlpWeights:
        return self.tower_adapter.mlp_weights(mlp)

    def make_mlp(self, weights: MlpWeights) -> nn.Module:
        return self.tower_adapter.make_mlp(weights)

    def down_proj(self, mlp: nn.Module) -> nn.Module:
        return self.tower_adapter.down_proj(mlp)

    def mlp_width(self, block: nn.Module) -> int:
        return self.tower_adapter.mlp_width(block)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return self.tower_adapter.num_prefix_tokens(vision_tower(model))

    def set_num_prefix_tokens(self, model: nn.Module, n: int) -> None:
        self.tower_adapter.set_num_prefix_tokens(vision_tower(model), n)

    def insertion_point(self, model: nn.Module) -> tuple[nn.Module, str]:
        return self.tower_adapter.insertion_point(vision_tower(model))

    def embed_dim(self, model: nn.Module) -> int:
        return self.tower_adapter.embed_dim(vision_tower(model))

    def attention(self, block: nn.Module) -> AttentionParts:
        return self.tower_adapter.attention(block)

    def patch_embed(self, model: nn.Module) -> nn.Conv2d:
        return self.tower_adapter.patch_embed(vision_tower(model))

    def block_output(self, output: object) -> torch.Tensor:
        return self.tower_adapter.block_output(output)

    # --- preprocessing: the VLM's own image processor --------------------------------------------
    def preprocess_config(self, model: nn.Module) -> dict:
        cfg = getattr(model, PREPROCESS_ATTR, None)
        return dict(cfg) if cfg else self.tower_adapter.preprocess_config(vision_tower(model))  # type: ignore[attr-defined]

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        return tuple(self.preprocess_config(model)["input_size"])  # type: ignore[return-value]

    def data_transform(self, model: nn.Module) -> Callable:
        proc = getattr(model, IMAGE_PROCESSOR_ATTR, None)
        if proc is not None:
            return ProcessorTransform(proc)
        return self.tower_adapter.data_transform(vision_tower(model))  # type: ignore[attr-defined]

    # --- running -----------------------------------------------------------------------------------
    def native_prefix(self, model: nn.Module) -> int:
        """CLS tokens of the stock tower (1 for CLIP, 0 for SigLIP)."""
        tower = vision_tower(model)
        n = getattr(tower, NATIVE_PREFIX_ATTR, None)
        return int(n) if n is not None else self.tower_adapter.default_prefix(tower)  # type: ignore[attr-defined]

    def image_token_count(self, model: nn.Module, pixels: torch.Tensor) -> int:
        """Image features per image as the VLM selects them: patches, plus the CLS token under `full`."""
        k = self.patch_embed(model).kernel_size
        patches = (pixels.shape[-2] // k[0]) * (pixels.shape[-1] // k[1])
        _, strategy = feature_selection(model)
        return patches + self.native_prefix(model) - (1 if strategy == "default" else 0)

    def judged_input_ids(self, model: nn.Module, pixels: torch.Tensor, image_tokens: int | None = None) -> torch.Tensor:
        """The image's placeholders followed by TEXT_LENGTH fixed text tokens (the same for every image)."""
        cfg = model.config
        image_id = int(cfg.image_token_id)
        specials = {image_id, getattr(cfg.text_config, "pad_token_id", None)}
        text = [t for t in range(1, int(cfg.text_config.vocab_size)) if t not in specials][:TEXT_LENGTH]
        n = self.image_token_count(model, pixels) if image_tokens is None else image_tokens
        return torch.tensor([image_id] * n + text, device=pixels.device).unsqueeze(0).expand(pixels.shape[0], -1)

    def forward_features_and_logits(self, model: nn.Module, pixels: torch.Tensor, all_images: bool = False,
                                    **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """(projector input features [B, N, D'], the VLM's output on image + fixed text for the first
        `logits_images` images: all of them unless the language model is streamed, or `all_images`)."""
        feats: list[torch.Tensor] = []
        hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda _m, a: feats.append(a[0]))
        ids = self.judged_input_ids(model, pixels)
        k = pixels.shape[0] if all_images else logits_images(model, pixels.shape[0], ids.shape[1])
        try:
            out = model(input_ids=ids[:k], pixel_values=pixels[:k], attention_mask=torch.ones_like(ids[:k]),
                        use_cache=False, return_dict=True, **kwargs)
            if k < pixels.shape[0]:  # the other images' features: tower and projector only
                model.model.get_image_features(pixel_values=pixels[k:])
        finally:
            hook.remove()
        return torch.cat(feats), out

    def forward_effect(self, model: nn.Module, pixels: torch.Tensor) -> None:
        self.forward_tokens(model, pixels)  # the effect statistics watch the tower

    def forward_tokens(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """The tower alone (discovery): its token output, registers removed."""
        return self.tower_adapter.forward_tokens(vision_tower(model), pixels)

    def forward_pooled(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_both(model, pixels)[0]

    def forward_both(self, model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, T, vocab], image features [B, N, D']): what the judge compares (`output_names`)."""
        feats, out = self.forward_features_and_logits(model, pixels)
        return out.logits, feats


class SquareTilesTransform:
    """LLaVA-NeXT: the image resized to a square `size` (one grid pinpoint, so every image gives the same
    tiles), then the VLM's own processor: [tiles, 3, H, W], tile 0 the whole image, each tile an image
    to the tower."""

    def __init__(self, image_processor: Any, size: int) -> None:
        self.image_processor, self.size = image_processor, int(size)

    def __call__(self, image: Any) -> torch.Tensor:
        from PIL import Image

        square = image.convert("RGB").resize((self.size, self.size), Image.BICUBIC)
        return self.image_processor(images=square, return_tensors="pt")["pixel_values"][0].to(torch.float32)


def square_pinpoint(model: nn.Module) -> int:
    """The largest square any-resolution grid pinpoint (the tower's image size when there is none)."""
    squares = [int(h) for h, w in (getattr(model.config, "image_grid_pinpoints", None) or []) if h == w]
    return max(squares) if squares else int(model.config.vision_config.image_size)


@hf_family(model_types={"llava_next": "LlavaNextForConditionalGeneration"},
           towers={"hf_llava_next_clip": (HF_CLIP, Organism(LLAVA_NEXT)),
                   "hf_llava_next_siglip": (HF_SIGLIP, Organism(LLAVA_NEXT, {"tower": "siglip", "strategy": "full"}))})
class HFLlavaNext(HFVisionLanguage):
    """`LlavaNextForConditionalGeneration`: any-resolution tiles, each its own image to the tower; the
    features of the tiles are packed (unpadded, newline rows) by the VLM. Calibration and check images
    are squared to one grid pinpoint (`SquareTilesTransform`), so batches stack: [B, tiles, 3, H, W]."""

    def data_transform(self, model: nn.Module) -> Callable:
        proc = getattr(model, IMAGE_PROCESSOR_ATTR, None)
        if proc is None:
            return super().data_transform(model)
        return SquareTilesTransform(proc, square_pinpoint(model))

    def forward_tokens(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return super().forward_tokens(model, pixels.flatten(0, 1) if pixels.dim() == 5 else pixels)

    def forward_features_and_logits(self, model: nn.Module, pixels: torch.Tensor, all_images: bool = False,
                                    **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """One tower pass through the VLM's own feature code (tiles, selection, projector, packing); the
        packed features then fill the `<image>` placeholders of the judged prompt, as the VLM's forward does."""
        B, size = pixels.shape[0], square_pinpoint(model)
        sizes = torch.tensor([[size, size]] * B, device=pixels.device)
        layer, strategy = feature_selection(model)
        feats: list[torch.Tensor] = []
        hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda _m, a: feats.append(a[0]))
        try:
            packed = model.model.get_image_features(pixel_values=pixels, image_sizes=sizes, vision_feature_layer=layer,
                                                    vision_feature_select_strategy=strategy).pooler_output
        finally:
            hook.remove()
        image = torch.cat(list(packed)) if isinstance(packed, (list, tuple)) else packed
        ids = self.judged_input_ids(model, pixels, image_tokens=image.shape[0] // B)
        k = B if all_images else logits_images(model, B, ids.shape[1])
        ids, image = ids[:k], image[: k * (image.shape[0] // B)]
        embeds = model.get_input_embeddings()(ids)
        mask = (ids == int(model.config.image_token_id)).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, image.to(embeds.dtype))
        out = model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), use_cache=False, return_dict=True,
                    **kwargs)
        tiles = feats[0]
        return tiles.reshape(B, -1, tiles.shape[-1]), out


@hf_family(model_types={"llava_onevision": "LlavaOnevisionForConditionalGeneration"},
           towers={"hf_llava_onevision_siglip": (HF_SIGLIP, Organism(ORGANISMS + "vlm:build_llava_onevision_organism"))})
class HFLlavaOnevision(HFLlavaNext):
    """`LlavaOnevisionForConditionalGeneration`: LLaVA-NeXT's any-resolution tiles (packed by the VLM, with
    its `vision_aspect_ratio` cap) on a SigLIP tower (the released OneVision models' tower)."""


@hf_family(model_types={"paligemma": "PaliGemmaForConditionalGeneration"},
           towers={"hf_paligemma": (HF_SIGLIP, Organism(ORGANISMS + "vlm:build_paligemma_organism"))})
class HFPaliGemma(HFVisionLanguage):
    """`PaliGemmaForConditionalGeneration`: a SigLIP tower (no CLS) whose `last_hidden_state` (every token,
    after the post-layernorm) goes through a linear projector; the language model is Gemma."""


def prepare_vlm(model: nn.Module, adapter: HFVisionLanguage) -> None:
    """A freshly loaded VLM: its tower drops register rows from its outputs from now on."""
    tower = vision_tower(model)
    drop_registers_from_outputs(tower, adapter.tower_adapter.default_prefix(tower))  # type: ignore[attr-defined]


HF_LLAVA_CLIP, HF_LLAVA_SIGLIP = HFVisionLanguage.family.adapters  # type: ignore[attr-defined]
HF_LLAVA_NEXT_CLIP, HF_LLAVA_NEXT_SIGLIP = HFLlavaNext.family.adapters  # type: ignore[attr-defined]
HF_LLAVA_ONEVISION_SIGLIP = HFLlavaOnevision.family.adapter  # type: ignore[attr-defined]
HF_PALIGEMMA = HFPaliGemma.family.adapter  # type: ignore[attr-defined]
# every VLM adapter, in registration order (the order they are tried in)
VLM_ADAPTERS = tuple(adapter for family in vlm_families() for adapter in family.adapters)
