"""The marker that makes every stock transformers loader refuse a baked HF or VLM folder.

A baked folder's vision config (config.json itself for a vision model; its `vision_config` for CLIPModel
and the VLMs) holds `id2label = {STOCK_REFUSAL: STOCK_REFUSAL}`. transformers' config classes turn the
id2label keys into integers while the config object is built from the file, before any keyword argument
of `from_pretrained` is applied (`attn_implementation`, `dtype`, `device_map`, `num_labels`, even
`id2label`), so the stock config class cannot be built and no stock loader path (AutoModel*, the concrete
class, `pipeline`, AutoConfig + `from_config`) returns a model: it raises `ValueError: invalid literal for
int() with base 10: 'vit-surgery: ...'`. The remote-code config classes (modeling_vit_surgery.py, which
inlines this file) take the marker out when built and put it back when serialised, so a re-saved model
stays closed. A vision model has no label map to lose (its id2label is transformers' unused default).

Standard library only: this file is inlined into the standalone modeling file.
"""
from typing import Any

STOCK_REFUSAL = ("vit-surgery: test-time registers are baked into this model; the stock class would load it "
                 "unfixed. Load it with trust_remote_code=True (modeling_vit_surgery.py)")
_MARKED_SUB_CONFIG = "vision_config"


def _marked_level(cfg: dict) -> dict:
    sub = cfg.get(_MARKED_SUB_CONFIG)
    return sub if isinstance(sub, dict) else cfg


def mark_stock_refusal(cfg: dict) -> dict:
    """`cfg` (a config.json dict, changed in place and returned) with the marker in its vision config."""
    _marked_level(cfg)["id2label"] = {STOCK_REFUSAL: STOCK_REFUSAL}
    return cfg


def without_stock_refusal(cfg: dict) -> dict:
    """A copy of `cfg` (config.json or config kwargs) a stock config class builds: the marker taken out
    wherever it is."""
    out: dict[str, Any] = dict(cfg)
    for level in (out, out.get(_MARKED_SUB_CONFIG)):
        if isinstance(level, dict) and isinstance(level.get("id2label"), dict) and STOCK_REFUSAL in level["id2label"]:
            if level is not out:
                level = out[_MARKED_SUB_CONFIG] = dict(level)
            del level["id2label"]
    return out
