"""A VLM of any size with only its vision tower in memory: the language model stays in its files.

The VLM is built with every parameter on the meta device (buffers computed as usual: rotary tables,
position ids); then the tensors outside the language model (the tower, the projector, `image_newline`)
are read from the checkpoint and put in place. The language model (`model.language_model`, `lm_head`)
runs, when something runs it (the judge's logits, inspect's attention report), one unit at a time: each
module of it that holds weights (a projection, a norm, the embeddings, the head) is read from the
checkpoint in float32 when its forward starts and dropped when it ends, into one reused region of memory
(`_Arena`: no fresh allocation, page faults and zeroing per layer). So memory is the tower plus the largest
such module (the head or the embeddings), whatever the VLM's size, and the language model always computes
in float32 (the judge compares logits computed with the same float32 language model on the baked and the
reference image features).

Names: transformers' own renaming rules (transformers/conversion_mapping.py, e.g. the hub's legacy
`language_model.model.*`, `vision_tower.vision_model.*`) map the checkpoint's tensor names to the
model's; the writer keeps the checkpoint's names (surgery/backends/hf/vlm_writer.py).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ...core.errors import ModelInputError
from ...core.memory import STREAM_CHUNK_ELEMENTS, STREAM_STAGING_BYTES
from ...core.modules import attach_legacy_branches, fold_attached_legacy_branches, stores_legacy_branches
from ...core.safetensors_io import ShardedCheckpoint

CHECKPOINT_ATTR = "surgery_checkpoint"  # the VlmCheckpoint a streamed VLM reads its tensors from
LM_PREFIXES = ("model.language_model.", "lm_head.")  # what stays in the files (streamed when run)
_PREFIX_ATTR = "surgery_stream_prefix"
_SAVED_ATTR = "surgery_stream_saved"
_PADDING_ATTR = "surgery_stream_padding_idx"


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built within the context get their parameters on the meta device (no memory, no init
    cost); buffers are computed on the CPU as usual (rotary tables, position ids are not in checkpoints)."""

    def to_meta(_module: nn.Module, _name: str, param: Optional[nn.Parameter]) -> Optional[nn.Parameter]:
        if param is None or param.device.type == "meta":
            return None
        return nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def checkpoint_names(model: nn.Module, stored: list[str]) -> dict[str, str]:
    """model tensor name -> checkpoint tensor name, by transformers' own renaming rules for this model;
    tied parameters (a head sharing the embeddings) map to the stored copy."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    wanted = model.state_dict()
    found: dict[str, str] = {}
    for name in stored:
        if name in wanted:
            found.setdefault(name, name)
            continue
        renamed, converter = rename_source_key(name, renamings, converters, model.base_model_prefix, wanted)
        if converter is None and renamed in wanted:
            found.setdefault(renamed, name)
    by_object: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in found:
            by_object.setdefault(id(p), found[name])
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in found and id(p) in by_object:
            found[name] = by_object[id(p)]
    return found


class VlmCheckpoint:
    """The checkpoint of a streamed VLM and the model's names for its tensors."""

    def __init__(self, files: ShardedCheckpoint, names: dict[str, str], spec: str) -> None:
        self.files, self.names, self.spec = files, names, spec

    def __deepcopy__(self, memo: dict) -> "VlmCheckpoint":
        return self

    def tensor(self, model_name: str) -> torch.Tensor:
        return self.files.tensor(self.names[model_name])

    def read_into(self, model_name: str, out: torch.Tensor, staging: Optional[torch.Tensor] = None,
                  start_row: int = 0) -> None:
        self.files.read_into(self.names[model_name], out, staging, start_row)

    def hash_bytes(self, model_name: str, h: Any) -> None:
        self.files.hash_bytes(self.names[model_name], h)

    def lm_parameters(self) -> int:
        """Elements of the language model's stored tensors (what one streamed pass computes with)."""
        stored = {c for m, c in self.names.items() if m.startswith(LM_PREFIXES)}
        total = 0
        for c in stored:
            n = 1
            for d in self.files.info(c)["shape"]:
                n *= int(d)
            total += n
        return total


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def _resident_names(model: nn.Module) -> list[str]:
    return [n for n in model.state_dict() if not n.startswith(LM_PREFIXES)]


@torch.no_grad()
def materialise_resident(model: nn.Module, ckpt: VlmCheckpoint, dtype: Optional[torch.dtype] = None) -> None:
    """Read every tensor outside the language model from the checkpoint into `model` (floating ones in
    `dtype`, else as stored); a tensor the checkpoint lacks is refused in one line."""
    names = _resident_names(model)
    missing = [n for n in names if n not in ckpt.names]
    lm_missing = [n for n, _ in model.named_parameters(remove_duplicate=False)
                  if n.startswith(LM_PREFIXES) and n not in ckpt.names]
    if missing or lm_missing:
        first = (missing or lm_missing)[0]
        raise ModelInputError(f"{ckpt.spec}: the weights lack {len(missing) + len(lm_missing)} tensor(s) the "
                              f"{type(model).__name__} needs (e.g. {first}); refusing to run with randomly "
                              "initialised weights")
    for name in names:
        t = ckpt.tensor(name)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        owner, leaf = _owner(model, name)
        if leaf in owner._parameters:
            want = owner._parameters[leaf]
            if tuple(want.shape) != tuple(t.shape):
                raise ModelInputError(f"{ckpt.spec}: weights do not match the model config ({name}: stored "
                                      f"{tuple(t.shape)}, the model has {tuple(want.shape)})")
            owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            owner._buffers[leaf] = t


def _stream_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name prefix, module) of the language model's units run one at a time: every module holding weights
    of its own (projections, norms, embeddings) and the head. A module whose forward reads a child's weights
    without calling the child would see meta tensors; transformers' decoders call their children."""
    units = [(f"model.language_model.{name}." if name else "model.language_model.", m)
             for name, m in model.model.language_model.named_modules() if m._parameters]
    units.append(("lm_head.", model.lm_head))
    return units


class _Arena:
    """The memory a streamed unit's float32 weights live in while it runs, reused unit after unit (only one
    unit is in memory at a time, across every streamed model of the process), and the small staging buffer
    the stored bytes are read through."""

    def __init__(self) -> None:
        self.weights: dict[torch.device, torch.Tensor] = {}
        self._staging: Optional[torch.Tensor] = None

    @property
    def staging(self) -> torch.Tensor:
        if self._staging is None:
            self._staging = torch.empty(STAGING_BYTES, dtype=torch.uint8)
        return self._staging

    def region(self, device: torch.device, numel: int) -> torch.Tensor:
        have = self.weights.get(device)
        if have is None or have.numel() < numel:
            self.weights.pop(device, None)  # the old region goes before the larger one is made
            have = self.weights[device] = torch.empty(numel, dtype=torch.float32, device=device)
        return have[:numel]


STAGING_BYTES = STREAM_STAGING_BYTES  # stored bytes are read and converted 16 MiB at a time
# A projection or embedding table larger than this (elements; 128 MiB in float32) is never in memory whole:
# a projection runs in chunks of its output rows (a 7B's MLP, a 150k-vocabulary head: 2 GB in float32), an
# embedding table reads only the rows of the token ids it is asked for (core/memory.py estimates the same).
CHUNK_ELEMENTS = STREAM_CHUNK_ELEMENTS
_ARENA = _Arena()


def _is_chunked_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.weight.numel() > CHUNK_ELEMENTS


def _is_row_embedding(module: nn.Module) -> bool:
    return (isinstance(module, nn.Embedding) and module.weight.numel() > CHUNK_ELEMENTS and module.max_norm is None
            and not module.sparse)


def _chunked_linear_forward(module: nn.Linear, ckpt: VlmCheckpoint, prefix: str) -> Any:
    """`module`'s forward computed chunk of output rows by chunk, each chunk's weights read into the arena:
    the same products, never the whole matrix in memory."""
    import torch.nn.functional as F

    def forward(x: torch.Tensor) -> torch.Tensor:
        rows_total, width = module.weight.shape
        out = torch.empty(*x.shape[:-1], rows_total, dtype=torch.float32, device=x.device)
        step = max(1, CHUNK_ELEMENTS // max(1, width))
        for i in range(0, rows_total, step):
            j = min(rows_total, i + step)
            with torch.inference_mode(False), torch.no_grad():  # the arena is a plain tensor, in and out of it
                region = _ARENA.region(x.device, (j - i) * (width + 1))
                w = region[: (j - i) * width].view(j - i, width)
                ckpt.read_into(prefix + "weight", w, _ARENA.staging, start_row=i)
                b = None
                if module.bias is not None:
                    b = region[(j - i) * width:]
                    ckpt.read_into(prefix + "bias", b, _ARENA.staging, start_row=i)
            out[..., i:j] = F.linear(x, w, b)
        return out

    return forward


class _Streamer:
    """The forward hooks that bring a unit's weights in (float32) and take them out again."""

    def __init__(self, ckpt: VlmCheckpoint) -> None:
        self.ckpt = ckpt

    def __deepcopy__(self, memo: dict) -> "_Streamer":
        return self

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        prefix = getattr(module, _PREFIX_ATTR)
        inputs = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        device = inputs[0].device if inputs else torch.device("cpu")  # where the rest of the model runs
        if _is_row_embedding(module) and args and isinstance(args[0], torch.Tensor):
            return self._enter_rows(module, prefix, args, kwargs, device)
        saved = []
        with torch.inference_mode(False), torch.no_grad():  # plain tensors: usable inside and outside
            wanted = [(name, p) for name, p in module.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
            region = _ARENA.region(device, sum(p.numel() for _, p in wanted))
            offset = 0
            for name, p in wanted:
                owner, leaf = _owner(module, name)
                saved.append((owner, leaf, p))
                weight = region[offset:offset + p.numel()].view(p.shape)
                offset += p.numel()
                self.ckpt.read_into(prefix + name, weight, _ARENA.staging)
                owner._parameters[leaf] = nn.Parameter(weight, requires_grad=False)
        setattr(module, _SAVED_ATTR, saved)

    def _enter_rows(self, module: nn.Module, prefix: str, args: tuple, kwargs: dict, device: torch.device) -> Any:
        """An embedding table too large to read whole: the rows of the ids asked for, as a small table the
        ids are renumbered into (the module's own forward then runs on it, scaling and all)."""
        ids = args[0]
        wanted, renumbered = torch.unique(ids, return_inverse=True)
        width = module.weight.shape[1]
        with torch.inference_mode(False), torch.no_grad():
            table = _ARENA.region(device, wanted.numel() * width).view(wanted.numel(), width)
            for k, row in enumerate(wanted.tolist()):
                self.ckpt.read_into(prefix + "weight", table[k], _ARENA.staging, start_row=int(row))
            saved = [(module, "weight", module.weight)]
            module._parameters["weight"] = nn.Parameter(table, requires_grad=False)
        setattr(module, _SAVED_ATTR, saved)
        setattr(module, _PADDING_ATTR, module.padding_idx)
        module.padding_idx = None  # an index into the whole table (forward ignores it: it only shapes gradients)
        return (renumbered,) + tuple(args[1:]), kwargs

    def leave(self, module: nn.Module, _args: tuple, _out: Any) -> None:
        for owner, leaf, p in getattr(module, _SAVED_ATTR, []):
            owner._parameters[leaf] = p
        setattr(module, _SAVED_ATTR, [])
        if hasattr(module, _PADDING_ATTR):
            module.padding_idx = getattr(module, _PADDING_ATTR)
            delattr(module, _PADDING_ATTR)


def install_lm_stream(model: nn.Module, ckpt: VlmCheckpoint) -> None:
    """From now on the language model runs unit by unit from the checkpoint, in float32."""
    streamer = _Streamer(ckpt)
    for prefix, module in _stream_units(model):
        setattr(module, _PREFIX_ATTR, prefix)
        if _is_chunked_linear(module):
            module.forward = _chunked_linear_forward(module, ckpt, prefix)
            continue
        module.register_forward_pre_hook(streamer.enter, with_kwargs=True)
        module.register_forward_hook(streamer.leave)
    setattr(model, CHECKPOINT_ATTR, ckpt)


def streamed_checkpoint(model: nn.Module) -> Optional[VlmCheckpoint]:
    return getattr(model, CHECKPOINT_ATTR, None)


def build_streamed(cls: type, config: Any, files: ShardedCheckpoint, spec: str, *, dtype: Optional[torch.dtype],
                   before_load: Any = None) -> nn.Module:
    """`cls(config)` with its parameters on the meta device, `before_load(model)` (baking a vit-surgery
    folder's structure), then the tensors outside the language model read from `files` (floating ones in
    `dtype`, None: as stored) and the language model streamed from them."""
    from .loader import quiet_transformers

    legacy = stores_legacy_branches(files.names())  # a vit-surgery 0.1.0 folder: its branches' own fc1 rows
    with quiet_transformers(), parameters_on_meta():
        model = cls(config).eval()
        if before_load is not None:
            before_load(model)
            if legacy:
                attach_legacy_branches(model)
    ckpt = VlmCheckpoint(files, checkpoint_names(model, files.names()), spec)
    materialise_resident(model, ckpt, dtype)
    if legacy:
        fold_attached_legacy_branches(model)
    if dtype is not None:  # the language model's meta parameters follow (for dtype queries); nothing is allocated
        cast_parameters(model, dtype)
    install_lm_stream(model, ckpt)
    return model


@torch.no_grad()
def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """The floating parameters in `dtype`, buffers left as the model built them: `model.to(dtype)` would also
    round the buffers HF keeps in float32 in a half model (a Llama's rotary `inv_freq`, whose float16
    rounding moves the angles of late positions: logits off by ~1e-2 at 7B), so the judged model would not be
    the one `from_pretrained(dtype=...)` gives users."""
    for p in model.parameters():  # each once (tied ones stay tied): in place, as Module._apply does
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def move_resident(model: nn.Module, device: str | torch.device) -> None:
    """`model.to(device)` for a streamed VLM: what is in memory moves, the language model's units are read
    onto the device their inputs are on when they run."""
    from ...core.weights import move_in_memory

    move_in_memory(model, device)


def unmapped_tensors(ckpt: VlmCheckpoint) -> list[str]:
    """Stored tensors the model has no name for (copied to the output unchanged, reported)."""
    used = set(ckpt.names.values())
    return [n for n in ckpt.files.names() if n not in used]
