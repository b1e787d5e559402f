"""Refuse before the OOM killer: estimate what convert/check will hold at their peak, compare it with
what the machine (and its cgroup) can still give, and stop with one line when it does not fit.

The peak of convert (surgery/pipeline.py) is reached during the parity check, with both the source
and the reloaded output in memory:

  process now (imports + source model)
  + the reloaded output (built in float32, then cast to the written dtype: the float32 size counts)
  + one block of the source in float64 (the judge runs block by block, surgery/core/cast.py)
  + one batch of activations (the baked model's residuals for every block, held while the float64
    reference is compared with them as it runs; the float64 working set of one block)

Read from /proc/meminfo (MemAvailable) and the cgroup's memory.max/memory.current (v2) or
memory.limit_in_bytes/usage_in_bytes (v1); no psutil.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from .errors import ModelInputError, OutOfMemoryRisk

if TYPE_CHECKING:  # imported where tensors are measured: the config estimate runs before torch is imported
    import torch
    from torch import nn

GiB = 2 ** 30
MARGIN = 1.10  # allocator fragmentation and what the estimate leaves out (tokenisers, transforms)


def _read_int(path: str) -> Optional[int]:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def current_rss() -> int:
    """Resident memory of this process now (VmRSS), in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _inactive_file(cgroup: Path) -> int:
    try:
        for line in (cgroup / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file") and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def available_bytes() -> Optional[int]:
    """What new allocations can still get: MemAvailable, capped by the cgroup's limit minus its usage.
    None when neither can be read (not Linux): the check is then skipped."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_f), _read_int(usage_f)
        if limit is not None and usage is not None and limit < 2 ** 60:
            usage -= _inactive_file(Path(limit_f).parent)  # page cache the cgroup can reclaim
            room = max(0, limit - usage)
            avail = room if avail is None else min(avail, room)
            break
    return avail


def tensor_bytes(tensors: Iterable[torch.Tensor], dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of distinct tensors in memory (meta tensors take none), as stored or (floating ones) in `dtype`."""
    import torch

    seen: set[int] = set()
    total = 0
    for t in tensors:
        if id(t) in seen or t.device.type == "meta":  # meta: not in memory (a streamed VLM's language model)
            continue
        seen.add(id(t))
        size = t.element_size() if dtype is None or not t.is_floating_point() else torch.empty((), dtype=dtype).element_size()
        total += t.numel() * size
    return total


def module_bytes(module: nn.Module, dtype: Optional[torch.dtype] = None) -> int:
    return tensor_bytes(list(module.parameters()) + list(module.buffers()), dtype)


@dataclass
class Estimate:
    now: int  # the process as it is (imports + the source model)
    reload: int  # the written output, rebuilt for the check
    block64: int  # one block of the source in float64
    activations: int  # one batch
    copy: int = 0  # a copy in another dtype (--dtype different from the source's)
    stream: int = 0  # a streamed VLM's language model: one unit (layer / embeddings / head) in float32 + logits

    @property
    def peak(self) -> int:
        return int(self.now + MARGIN * (self.reload + self.block64 + self.activations + self.copy + self.stream))

    def describe(self) -> str:
        parts = [f"process now {self.now / GiB:.1f}", f"reloaded output {self.reload / GiB:.1f}",
                 f"one batch of activations {self.activations / GiB:.1f}"]
        if self.copy:
            parts.append(f"copy in the output dtype {self.copy / GiB:.1f}")
        if self.stream:
            parts.append(f"streamed language model {self.stream / GiB:.1f}")
        return f"{self.peak / GiB:.1f} GiB ({', '.join(parts)} GiB, +{MARGIN - 1:.0%} on what is added)"


def activation_bytes(num_blocks: int, width: int, tokens: int, batch: int, heads: int, out_dtype: torch.dtype,
                     mlp_ratio: float = 4.0) -> int:
    """One batch: the baked model's residual for every block (held until the float64 reference has
    compared them), a half model's own hooked run too, and the float64 working set of one block
    (MLP hidden layer, attention probabilities)."""
    import torch

    elem = torch.empty((), dtype=out_dtype).element_size()
    held = (num_blocks + 2) * batch * tokens * width * elem
    if out_dtype in (torch.float16, torch.bfloat16):
        held *= 2
    working = batch * (tokens * width * (2 * mlp_ratio + 4) + heads * tokens * tokens) * 8
    compare = 3 * batch * tokens * width * 8  # one output judged: baked and reference in float64, difference
    return int(held + 2 * working + compare)  # x2: a block's input and output live together


def require_fits(estimate: Estimate, what: str = "convert") -> None:
    """Stop with one line (exit 13) when the estimated peak exceeds what is available now."""
    if os.environ.get("VIT_SURGERY_SKIP_MEMORY_CHECK"):
        return
    avail = available_bytes()
    if avail is None:
        return
    extra = estimate.peak - estimate.now
    if extra <= avail:
        return
    raise OutOfMemoryRisk(
        f"{what} would need about {estimate.describe()}, {avail / GiB:.1f} GiB is available beyond this "
        f"process: stopped before running out of memory (nothing written); options: {{device}} cuda, "
        f"fewer parity images ({{check_images}} with fewer files, or {{batch_size}} 1), {{dtype}} "
        f"float16/bfloat16, or a machine with more memory", parameters=("device", "check_images", "batch_size", "dtype"))


def tokens_for(input_size: tuple[int, int, int], patch: int, prefix: int) -> int:
    return prefix + math.ceil(input_size[1] / patch) * math.ceil(input_size[2] / patch)


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim). Memory torch frees in chunks under
    glibc's mmap threshold stays in the process otherwise: after a skeleton's tensors are replaced by
    the checkpoint's, that is a third of a model of RSS for nothing. No-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---- before a model is built: its size from its config ------------------------------------------

def _first_int(docs: list[dict[str, Any]], keys: tuple[str, ...], default: float) -> float:
    for doc in docs:
        for k in keys:
            v = doc.get(k)
            if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v):
                v = max(v)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue  # absent, or not a number: the library's own loader says what is wrong
            if not math.isfinite(v) or v <= 0:
                raise ModelInputError(f"config.json: {k} must be a positive number, got {v!r}")
            return float(v)
    return default


def config_weight_bytes(cfg: dict[str, Any]) -> int:
    """float32 bytes of the ViT a config describes (timm `model_args`, HF `vision_config` or top level):
    depth x (attention 4 w^2 + MLP 2 w h) + positional embedding (tokens x w). Unknown fields take ViT-B
    values, so a config that names nothing absurd estimates an ordinary model."""
    docs = [d for d in (cfg.get("model_args"), cfg.get("vision_config"), cfg.get("pretrained_cfg"), cfg)
            if isinstance(d, dict)]
    depth = _first_int(docs, ("depth", "num_hidden_layers", "layers"), 12)
    width = _first_int(docs, ("embed_dim", "hidden_size", "width"), 768)
    hidden = _first_int(docs, ("intermediate_size", "mlp_dim"), 0) or width * _first_int(docs, ("mlp_ratio",), 4)
    side = _first_int(docs, ("img_size", "image_size", "input_size"), 224)
    patch = _first_int(docs, ("patch_size",), 16)
    tokens = math.ceil(side / patch) ** 2 + 1
    return int(4 * (depth * (4 * width * width + 2 * width * hidden) + tokens * width))


# A VLM's text config names only what differs from its class's defaults (LLaVA-1.5's hub config: vocab
# and a few more): what it leaves out is taken as Llama-2-7B's, LlavaConfig's default text model.
_TEXT_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "vocab_size": 32000}


# A streamed language model's module larger than this (elements) is read in pieces (row chunks of a
# projection, the asked rows of an embedding table): surgery/backends/hf/vlm_stream.py.
STREAM_CHUNK_ELEMENTS = 1 << 25
STREAM_STAGING_BYTES = 1 << 24  # the buffer stored bytes are read through


def text_config_bytes(cfg: dict[str, Any]) -> tuple[int, int]:
    """float32 bytes of a VLM's language model from its `text_config`: (the whole of it, what streaming it
    holds at once: its largest module, or a chunk of STREAM_CHUNK_ELEMENTS when larger, the staging buffer
    and the logits of a judged prompt of the tower's image tokens, up to 5 tiles for any-resolution VLMs)."""
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    docs = [text, _TEXT_DEFAULTS]
    width = _first_int(docs, ("hidden_size",), 4096)
    hidden = _first_int(docs, ("intermediate_size",), 4 * width)
    depth = _first_int(docs, ("num_hidden_layers",), 32)
    vocab = _first_int(docs, ("vocab_size",), 32000)
    heads = _first_int([text], ("num_attention_heads",), 32)
    kv = _first_int([text], ("num_key_value_heads",), heads)
    head_dim = _first_int([text], ("head_dim",), width / heads)
    attention = 2 * width * heads * head_dim + 2 * width * kv * head_dim
    layer = attention + 3 * width * hidden  # gated MLP (Llama, Mistral, Qwen2, Gemma)
    embed = vocab * width
    tied = bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)))
    largest = max(width * heads * head_dim, width * hidden, embed)
    vision = cfg.get("vision_config") if isinstance(cfg.get("vision_config"), dict) else {}
    side = _first_int([vision], ("image_size",), 336) // max(1, _first_int([vision], ("patch_size",), 14))
    tiles = 5 if cfg.get("image_grid_pinpoints") else 1  # any-resolution VLMs: the image and up to 4 tiles
    tokens = tiles * side * side + 64
    logits = 4 * vocab * tokens
    activations = 4 * tokens * (4 * width + 3 * hidden)  # a layer's residual, q/k/v/out and gated MLP
    unit = 4 * min(largest, STREAM_CHUNK_ELEMENTS) + STREAM_STAGING_BYTES + logits + activations
    return int(4 * (depth * layer + embed * (1 if tied else 2))), int(unit)


def vlm_config_peak(cfg: dict[str, Any], streamed: bool) -> int:
    """What loading a VLM and judging it needs, from its config: streamed (safetensors), the tower twice
    (source and reloaded output) plus one language-model unit read and cast to float32 (twice: the stored
    copy and the float32 one) and the logits; loaded whole (a pickled checkpoint), two copies of the whole VLM."""
    tower = config_weight_bytes({k: v for k, v in cfg.items() if k != "text_config"})
    whole, unit = text_config_bytes(cfg)
    return int(2 * tower + 2 * unit) if streamed else int(2 * (tower + whole))


def require_config_fits(spec: str, cfg: dict[str, Any], streamed: Optional[bool] = None) -> None:
    """Refuse (exit 13) a config whose model could not even be built here: building and loading it holds
    about two copies of its weights. Read from config.json alone, before anything is allocated. For a VLM
    the caller says which path will run (`streamed`: its language model stays in its safetensors files;
    False: the whole VLM is loaded) and the whole config counts, `text_config` included; None: the
    vision model alone."""
    if os.environ.get("VIT_SURGERY_SKIP_MEMORY_CHECK"):
        return
    vlm = streamed is not None
    need = vlm_config_peak(cfg, bool(streamed)) if vlm else 2 * config_weight_bytes(cfg)
    avail = available_bytes()
    if avail is None or need <= avail:
        return
    if vlm:
        how = ("its tower and the language model streamed one module at a time" if streamed else
               "the whole VLM (a pickled checkpoint; with safetensors only the tower is loaded)")
        raise OutOfMemoryRisk(f"{spec}: its config.json describes a VLM that needs about {need / GiB:.1f} GiB to "
                              f"convert ({how}), {avail / GiB:.1f} GiB is available: stopped before reading any "
                              "weights")
    raise OutOfMemoryRisk(f"{spec}: its config.json describes a model of about {need / 2 / GiB:.1f} GiB of "
                          f"weights (building and loading it needs about {need / GiB:.1f} GiB, "
                          f"{avail / GiB:.1f} GiB is available): stopped before building it")


# ---- before a model is built: what its config asks for besides the tower's weights ---------------------

def _pinpoints(doc: dict[str, Any]) -> list[Any]:
    """LLaVA-NeXT's `image_grid_pinpoints` of a config or image-processor doc (processor_config nests it)."""
    for d in (doc, doc.get("image_processor") if isinstance(doc.get("image_processor"), dict) else None):
        if isinstance(d, dict) and isinstance(d.get("image_grid_pinpoints"), list):
            return d["image_grid_pinpoints"]
    return []


def tile_bytes(docs: list[dict[str, Any]]) -> int:
    """float32 bytes of one image resized to LLaVA-NeXT's largest any-resolution pinpoint (the processor
    builds it before tiling), times 2 (the resized copy and its tiles). A pinpoint that is not two positive
    integers is a config error (exit 4)."""
    largest = 0
    for doc in docs:
        for point in _pinpoints(doc):
            if not (isinstance(point, (list, tuple)) and len(point) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in point)):
                raise ModelInputError(f"image_grid_pinpoints: each entry must be two positive integers "
                                      f"[height, width], got {point!r}")
            largest = max(largest, point[0] * point[1])
    return 2 * 3 * 4 * largest


def head_bytes(cfg: dict[str, Any]) -> int:
    """float32 bytes of a classifier head the config asks for (timm `num_classes` x width)."""
    docs = [d for d in (cfg.get("model_args"), cfg.get("pretrained_cfg"), cfg) if isinstance(d, dict)]
    given = [d.get("num_classes") for d in docs]
    classes = next((float(v) for v in given if isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v) and v > 0), 0.0)  # 0: no head (timm's headless models)
    width = _first_int(docs, ("embed_dim", "hidden_size", "width"), 768)
    return int(4 * classes * (width + 1))


def require_extras_fit(spec: str, cfg: dict[str, Any], processor_docs: Iterable[dict[str, Any]] = ()) -> None:
    """Refuse (exit 13) a config whose classifier head or LLaVA-NeXT tiles could not be held here, from the
    config (and image-processor) files alone, before anything is built or any image resized."""
    tiles = tile_bytes([cfg, *processor_docs])
    if os.environ.get("VIT_SURGERY_SKIP_MEMORY_CHECK"):
        return
    need = 2 * head_bytes(cfg) + tiles
    avail = available_bytes()
    if avail is not None and need > avail:
        raise OutOfMemoryRisk(f"{spec}: its config asks for about {need / GiB:.1f} GiB beyond the tower "
                              f"(classifier head {head_bytes(cfg) / GiB:.1f} GiB, one image at the largest "
                              f"image_grid_pinpoints {tiles / GiB:.1f} GiB); {avail / GiB:.1f} GiB is available: "
                              "stopped before building it")
