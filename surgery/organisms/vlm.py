"""Tiny LLaVA-style vision-language organisms: a planted CLIP or SigLIP tower, a small Llama, a local
tokenizer and processor, all written by the libraries' own `save_pretrained`.

The tower is the HF organism of `organism_families` (planted register neurons, 64 px, patch 8): the
VLM's tower is a copy of it, so discovery on the VLM finds the organism's planted units. The text
model is a 2-layer random Llama; the tokenizer is a `tokenizers` WordLevel vocabulary with `<image>`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .vit import ORGANISM_SIZE, Planting
from .families import HF_ORGANISM_PREPROCESSOR, build_hf_clip_organism
from ..core.output_format import write_json

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER:", "ASSISTANT:", "what", "is", "in", "the", "image",
         "?", "a", "cat", "dog", "number", "28", "32", "describe"]
IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
                 "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def build_tokenizer() -> Any:
    """A PreTrainedTokenizerFast over a WordLevel vocabulary (whitespace split) that knows `<image>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   padding_side="left",  # batched generation of a decoder-only model
                                   pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN})
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _text_config(num_layers: int = 2) -> dict[str, Any]:
    return dict(vocab_size=len(WORDS), hidden_size=48, intermediate_size=96, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def build_llava_organism(seed: int = 0, *, strategy: str = "default", feature_layer: int | list[int] = -2,
                         tower: str = "clip", plant: dict[int, list[tuple[int, int]]] | None = None,
                         text_hidden_size: int = 48) -> tuple[nn.Module, Planting]:
    """A `LlavaForConditionalGeneration` whose tower is the planted HF CLIP organism (`tower="clip"`) or the
    planted HF SigLIP organism (`"siglip"`: no CLS, use strategy `full`, as SigLIP LLaVAs do).
    `text_hidden_size` 64 (the tower's width) makes the projector `Linear -> GELU -> Linear` 64 -> 64 -> 64,
    shaped like a block's MLP."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tower_model, planting = _planted_tower(tower, seed, plant)
    text = LlamaConfig(**dict(_text_config(), hidden_size=text_hidden_size, intermediate_size=2 * text_hidden_size))
    cfg = LlavaConfig(vision_config=tower_model.config.to_dict(), text_config=text.to_dict(),
                      image_token_id=WORDS.index(IMAGE_TOKEN), vision_feature_select_strategy=strategy,
                      vision_feature_layer=feature_layer, projector_hidden_act="gelu", tie_word_embeddings=False)
    return _vlm_around(LlavaForConditionalGeneration, cfg, tower_model, seed), planting


def _planted_tower(tower: str, seed: int, plant: dict[int, list[tuple[int, int]]] | None) -> tuple[nn.Module, Planting]:
    from .eva import build_hf_siglip_organism

    return {"clip": build_hf_clip_organism, "siglip": build_hf_siglip_organism}[tower](seed, plant=plant)


def _vlm_around(model_class: type, cfg: Any, tower_model: nn.Module, seed: int) -> nn.Module:
    """The VLM built from `cfg` with the planted tower's weights. The projector's random init is tiny; a
    larger one makes the image visibly matter to the logits (and so does a drawn tile-newline row)."""
    torch.manual_seed(seed + 1)
    model = model_class(cfg).eval()
    model.model.vision_tower.load_state_dict(tower_model.state_dict())
    with torch.no_grad():
        for lin in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
            lin.weight.normal_(0, 0.2)
        if hasattr(model.model, "image_newline"):  # LLaVA-NeXT / OneVision
            model.model.image_newline.normal_(0, 1.0)
    model.generation_config.pad_token_id = 0
    return model


GRID_PINPOINTS = [[64, 128], [128, 64], [128, 128]]  # any-resolution grids of the LLaVA-NeXT organism (64 px tiles)


def build_llava_next_organism(seed: int = 0, *, strategy: str = "default", feature_layer: int | list[int] = -2,
                              tower: str = "clip", plant: dict[int, list[tuple[int, int]]] | None = None
                              ) -> tuple[nn.Module, Planting]:
    """A `LlavaNextForConditionalGeneration` (any-resolution 64 px tiles) around the planted HF CLIP organism
    (`tower="clip"`) or the planted HF SigLIP organism (`"siglip"`: no CLS, use strategy `full`)."""
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    tower_model, planting = _planted_tower(tower, seed, plant)
    cfg = LlavaNextConfig(vision_config=tower_model.config.to_dict(), text_config=LlamaConfig(**_text_config()).to_dict(),
                          image_token_id=WORDS.index(IMAGE_TOKEN), vision_feature_select_strategy=strategy,
                          vision_feature_layer=feature_layer, image_grid_pinpoints=GRID_PINPOINTS,
                          projector_hidden_act="gelu", tie_word_embeddings=False)
    return _vlm_around(LlavaNextForConditionalGeneration, cfg, tower_model, seed), planting


def build_llava_next_processor(strategy: str = "default", *, cls_token: bool = True) -> Any:
    """LlavaNextProcessor: LlavaNextImageProcessor (64 px tiles on GRID_PINPOINTS) + the WordLevel tokenizer.
    `num_additional_image_tokens` counts the tower's CLS (0 for a SigLIP tower)."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    p = HF_ORGANISM_PREPROCESSOR
    image_processor = LlavaNextImageProcessor(size=p["size"], crop_size=p["crop_size"], do_center_crop=True,
                                              image_mean=p["image_mean"], image_std=p["image_std"], resample=3,
                                              image_grid_pinpoints=GRID_PINPOINTS)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                              patch_size=ORGANISM_SIZE["patch_size"], vision_feature_select_strategy=strategy,
                              num_additional_image_tokens=int(cls_token), image_token=IMAGE_TOKEN,
                              chat_template=CHAT_TEMPLATE)


def build_llava_onevision_organism(seed: int = 0, *, tower: str = "siglip", strategy: str = "full",
                                   feature_layer: int | list[int] = -1,
                                   plant: dict[int, list[tuple[int, int]]] | None = None) -> tuple[nn.Module, Planting]:
    """A `LlavaOnevisionForConditionalGeneration` (LLaVA-NeXT's 64 px tiles, OneVision's defaults: SigLIP
    tower, strategy `full`, last layer) around the planted HF SigLIP (or CLIP) organism."""
    from transformers import LlamaConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    tower_model, planting = _planted_tower(tower, seed, plant)
    cfg = LlavaOnevisionConfig(vision_config=tower_model.config.to_dict(),
                               text_config=LlamaConfig(**_text_config()).to_dict(),
                               image_token_index=WORDS.index(IMAGE_TOKEN), video_token_index=0,
                               vision_feature_select_strategy=strategy, vision_feature_layer=feature_layer,
                               image_grid_pinpoints=GRID_PINPOINTS, projector_hidden_act="gelu",
                               tie_word_embeddings=False)
    return _vlm_around(LlavaOnevisionForConditionalGeneration, cfg, tower_model, seed), planting


def build_llava_onevision_processor(strategy: str = "full", *, cls_token: bool = False) -> Any:
    """LlavaOnevisionProcessor: LlavaOnevisionImageProcessor (64 px tiles on GRID_PINPOINTS) + the WordLevel
    tokenizer; `num_image_tokens` per tile: the tower's patches (+ CLS under `full`)."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    p = HF_ORGANISM_PREPROCESSOR
    image_processor = LlavaOnevisionImageProcessor(size={"height": 64, "width": 64}, image_mean=p["image_mean"],
                                                   image_std=p["image_std"], resample=3,
                                                   image_grid_pinpoints=GRID_PINPOINTS)
    video_processor = LlavaOnevisionVideoProcessor(size={"height": 64, "width": 64}, image_mean=p["image_mean"],
                                                   image_std=p["image_std"])
    return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                                   video_processor=video_processor,
                                   num_image_tokens=image_seq_length(strategy, cls=cls_token),
                                   vision_feature_select_strategy=strategy, image_token=IMAGE_TOKEN,
                                   chat_template=CHAT_TEMPLATE)


def build_paligemma_organism(seed: int = 0, *, plant: dict[int, list[tuple[int, int]]] | None = None
                             ) -> tuple[nn.Module, Any, Planting]:
    """A `PaliGemmaForConditionalGeneration` around the planted HF SigLIP organism (2-layer Gemma), with a
    PaliGemmaProcessor (SiglipImageProcessor at 64 px + the WordLevel tokenizer)."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers import SiglipImageProcessor

    from .eva import build_hf_siglip_organism

    tower_model, planting = build_hf_siglip_organism(seed, plant=plant)
    t = _text_config()
    text = GemmaConfig(vocab_size=t["vocab_size"], hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = PaliGemmaConfig(vision_config=tower_model.config.to_dict(), text_config=text.to_dict(),
                          image_token_index=WORDS.index(IMAGE_TOKEN), projection_dim=48, hidden_size=48)
    torch.manual_seed(seed + 1)
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    model.model.vision_tower.load_state_dict(tower_model.state_dict())
    with torch.no_grad():
        model.model.multi_modal_projector.linear.weight.normal_(0, 0.5)
    model.generation_config.pad_token_id = 0
    p = HF_ORGANISM_PREPROCESSOR
    image_processor = SiglipImageProcessor(size={"height": 64, "width": 64}, image_mean=p["image_mean"],
                                           image_std=p["image_std"], resample=3)
    image_processor.image_seq_length = image_seq_length("full")  # PaliGemma: every tower token, no CLS
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=build_tokenizer())
    return model, processor, planting


def build_llava_real_size(seed: int = 0) -> tuple[nn.Module, Any]:
    """A random-init LLaVA at real tower size: the CLIP ViT-L/14-336 tower of LLaVA-1.5 (24 layers, 577
    tokens), its 2-layer GELU projector, and a 2-layer Llama (hidden 2048) over the organism vocabulary;
    with a LlavaProcessor at 336 px (CLIP mean/std). No planted neurons: for size and time rows."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers import LlavaProcessor

    from ..backends.hf.adapter import CLIP_MEAN, CLIP_STD

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = dict(_text_config(), hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4,
                max_position_embeddings=1024)
    cfg = LlavaConfig(vision_config=vision.to_dict(), text_config=LlamaConfig(**text).to_dict(),
                      image_token_id=WORDS.index(IMAGE_TOKEN), vision_feature_select_strategy="default",
                      vision_feature_layer=-2, projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                         image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)
    return model, processor


def image_seq_length(strategy: str, cls: bool = False) -> int:
    """Image features per image of the organism's tower (64 px, patch 8): patches (+ CLS for `full`)."""
    n = (ORGANISM_SIZE["img_size"] // ORGANISM_SIZE["patch_size"]) ** 2
    return n + (1 if strategy == "full" and cls else 0)


def build_llava_processor(strategy: str = "default", *, cls_token: bool = True) -> Any:
    """LlavaProcessor: CLIPImageProcessor at the organism's 64 px (no crop margin) + the WordLevel tokenizer.
    `num_additional_image_tokens` counts the tower's CLS (0 for a SigLIP tower)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    p = HF_ORGANISM_PREPROCESSOR
    image_processor = CLIPImageProcessor(size=p["size"], crop_size=p["crop_size"], do_center_crop=True,
                                         image_mean=p["image_mean"], image_std=p["image_std"], resample=3)
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                          patch_size=ORGANISM_SIZE["patch_size"], vision_feature_select_strategy=strategy,
                          num_additional_image_tokens=int(cls_token), image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)


def save_vlm_organism(model: nn.Module, processor: Any, path: str | Path, *, with_processor: bool = True) -> Path:
    """The model, generation config and (unless told otherwise) the processor, by their own save_pretrained."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    if with_processor:
        processor.save_pretrained(path)
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text())


# The hub's legacy names for a tower saved by transformers 5 (which writes `vision_tower.<...>`): the
# llava-hf repos keep the CLIP/SigLIP vision model's own level, `vision_tower.vision_model.<...>`.
HUB_TOWER_RENAME = ("vision_tower.", "vision_tower.vision_model.")


def save_hub_layout(model: nn.Module, processor: Any, path: str | Path, *, max_shard_size: str = "200KB",
                    hub_names: bool = True) -> Path:
    """The VLM as a hub repo holds it: transformers' own `save_pretrained` in shards of `max_shard_size`
    (+ model.safetensors.index.json), then (`hub_names`) the tower's tensors renamed in every shard and in
    the index the way the hub stores them (`vision_tower.vision_model.*`; transformers 5 already writes
    `language_model.model.*`, `language_model.lm_head.weight`, `multi_modal_projector.*`)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    model.save_pretrained(path, safe_serialization=True, max_shard_size=max_shard_size)
    processor.save_pretrained(path)
    if not hub_names:
        return path
    old, new = HUB_TOWER_RENAME

    def rename(name: str) -> str:
        return new + name[len(old):] if name.startswith(old) and not name.startswith(new) else name

    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / shard), framework="pt") as f:
            tensors = {rename(k): f.get_tensor(k) for k in f.keys()}
            meta = f.metadata()
        save_file(tensors, str(path / shard), metadata=meta)
    index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
    write_json(index_path, index)
    return path
