"""open_clip image towers built on timm trunks (`TimmModel`: SigLIP / SigLIP2, EVA02-CLIP, PE-Core).

`visual.trunk` is an ordinary timm `VisionTransformer` or `Eva`; `visual.head` is open_clip's optional
projection (empty when the trunk's own head is the projection, as in the SigLIP, EVA02 and PE-Core
configs). Blocks, MLP units, token layout and the register's entry point (`trunk.norm_pre`) are the
trunk's, answered by the timm adapters; the pooled output is `visual(x)` = open_clip's image embedding
before normalisation. Pooling is the trunk's: 'token' reads CLS, 'avg' skips the prefix tokens and
the register, 'map' (attention-pool head) attends over every token, the register included, exactly as
the hooked reference does.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ...core.modules import MlpWeights
from ...core.adapter import AttentionParts, Adapter
from ..timm.eva import TIMM_EVA
from ..timm.adapter import TIMM


def _timm_model_class() -> type | None:
    try:
        from open_clip.timm_model import TimmModel
    except Exception:  # pragma: no cover  (open_clip is a dependency; keep `import surgery` working)
        return None
    return TimmModel


def _block_family(block: nn.Module) -> Adapter:
    return TIMM_EVA if type(block).__module__ == "timm.models.eva" else TIMM


class OpenClipTimmTrunk(Adapter):
    name = "open_clip_timm"

    def matches(self, model: nn.Module) -> bool:
        cls = _timm_model_class()
        if cls is None or not isinstance(model, cls):
            return False
        trunk = getattr(model, "trunk", None)
        return trunk is not None and (TIMM.matches(trunk) or TIMM_EVA.matches(trunk))

    @staticmethod
    def trunk_family(model: nn.Module) -> Adapter:
        return TIMM_EVA if TIMM_EVA.matches(model.trunk) else TIMM

    # --- delegated to the trunk's adapter ------------------------------------------------------
    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return self.trunk_family(model).blocks(model.trunk)

    def mlp_weights(self, mlp: nn.Module) -> MlpWeights:
        return TIMM_EVA.mlp_weights(mlp)  # the stricter of the two (refuses normalised hidden layers)

    def make_mlp(self, weights: MlpWeights) -> nn.Module:
        # Without the block at hand: gated units come back as timm's packed GluMlp, which computes
        # exactly what SwiGLU does (act(gate) * up); un-baking is only used to rebuild a source for `check`.
        return TIMM.make_mlp(weights)

    def down_proj(self, mlp: nn.Module) -> nn.Module:
        return mlp.fc2

    def attention(self, block: nn.Module) -> AttentionParts:
        return _block_family(block).attention(block)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return self.trunk_family(model).num_prefix_tokens(model.trunk)

    def set_num_prefix_tokens(self, model: nn.Module, n: int) -> None:
        self.trunk_family(model).set_num_prefix_tokens(model.trunk, n)

    def insertion_point(self, model: nn.Module) -> tuple[nn.Module, str]:
        return self.trunk_family(model).insertion_point(model.trunk)

    def embed_dim(self, model: nn.Module) -> int:
        return int(model.trunk.embed_dim)

    def patch_embed(self, model: nn.Module) -> nn.Conv2d:
        return model.trunk.patch_embed.proj

    # --- running the model ---------------------------------------------------------------------
    def forward_tokens(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return model.trunk.forward_features(pixels)

    def forward_pooled(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return model(pixels)

    def forward_both(self, model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = model.trunk.forward_features(pixels)
        return model.head(model.trunk.forward_head(tokens)), tokens  # = TimmModel.forward

    def preprocess_cfg(self, model: nn.Module) -> dict[str, Any]:
        from open_clip.model import get_model_preprocess_cfg

        cfg = dict(get_model_preprocess_cfg(model) or {})
        cfg.setdefault("size", tuple(model.image_size))
        return cfg

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        h, w = model.image_size
        return (3, int(h), int(w))

    def data_transform(self, model: nn.Module) -> Callable:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        cfg = self.preprocess_cfg(model)
        known = set(PreprocessCfg.__dataclass_fields__)
        return image_transform_v2(PreprocessCfg(**{k: v for k, v in cfg.items() if k in known}), is_train=False)


OPEN_CLIP_TIMM = OpenClipTimmTrunk()
