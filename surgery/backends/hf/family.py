"""One record per HF model family, registered by a decorator on its adapter class.

A family says, in one place next to its adapter: the `model_type`s of config.json it loads and the stock
transformers class each one loads as, further stock classes picked by `architectures[]`, the remote-code
class of the folders it writes (`VitSurgery<stock class>`, defined in remote_modeling.py) and the organism
its tests build. Every table the loaders and writers look things up in (`loader.ADAPTERS`,
`loader.HF_MODEL_TYPES`, `writer.REMOTE_CLASSES`, `vlm.VLM_ADAPTERS`, `vlm_loader.VLM_MODEL_TYPES`, each
adapter's classes) is derived from these records, in registration (= dispatch) order:

    @hf_family(model_types={"dinov2": "Dinov2Model"}, organism=Organism(ORGANISMS + "families:build_hf_dinov2_organism"))
    class HFDinov2(HFVisionAdapter): ...

    HF_DINOV2 = HFDinov2.family.adapter

A vision-language family names its towers instead: one adapter per tower, `cls(tower_adapter, name)`.
The organism is named, not imported: no library module imports surgery/organisms (tests/repo/test_architecture.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, TypeVar

from ...core.adapter import Adapter

REMOTE_PREFIX = "VitSurgery"  # remote-code class of a written folder: VitSurgery<stock class>
ORGANISMS = "surgery.organisms."  # where organism builders live


@dataclass(frozen=True)
class Organism:
    """A builder of the family's test organism, `"package.module:function"` plus keyword arguments; it
    returns the model first (then the planting; a VLM builder may return its processor too). Only the tests
    import and call it (tests/backends/test_backend_registry.py)."""

    builder: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HFFamily:
    """A model family of HF transformers: its adapter(s) and the names the loaders and writers need."""

    adapters: tuple[Adapter, ...]
    model_types: Mapping[str, str]  # config.json model_type -> the stock class it is loaded as
    organisms: Mapping[str, Organism]  # adapter name -> its organism
    arch_classes: tuple[str, ...] = ()  # further stock classes, chosen by config.json architectures[]
    vlm: bool = False  # a vision-language model (only its tower is baked)

    @property
    def adapter(self) -> Adapter:
        """The family's adapter (a vision family has one; a VLM family one per tower)."""
        return self.adapters[0]

    @property
    def stock_classes(self) -> tuple[str, ...]:
        """Every transformers class the family handles, model_type classes first."""
        return tuple(dict.fromkeys([*self.model_types.values(), *self.arch_classes]))

    @property
    def remote_classes(self) -> dict[str, str]:
        """Stock class -> the remote-code class of the folders written from it."""
        return {c: remote_class_name(c) for c in self.stock_classes}


FAMILIES: list[HFFamily] = []  # registration order: the order adapters are tried in
AdapterClass = TypeVar("AdapterClass", bound=type)


def remote_class_name(stock_class: str) -> str:
    return REMOTE_PREFIX + stock_class


def hf_family(*, model_types: Mapping[str, str], organism: Optional[Organism] = None, arch_classes: tuple[str, ...] = (),
              towers: Optional[Mapping[str, tuple[Adapter, Organism]]] = None) -> Callable[[AdapterClass], AdapterClass]:
    """Class decorator: builds the adapter(s) and registers the family's record, kept as `cls.family`.
    A vision family gives `organism`; a VLM family gives `towers` (adapter name -> (tower adapter,
    organism)) and gets one adapter per tower."""

    def register(cls: AdapterClass) -> AdapterClass:
        if towers is None:
            if organism is None:
                raise TypeError(f"{cls.__name__}: an HF family needs its organism")
            adapters: tuple[Adapter, ...] = (cls(),)
            organisms = {adapters[0].name: organism}
        else:
            adapters = tuple(cls(tower, name) for name, (tower, _) in towers.items())
            organisms = {name: built for name, (_, built) in towers.items()}
        record = HFFamily(adapters, dict(model_types), organisms, tuple(arch_classes), vlm=towers is not None)
        FAMILIES.append(record)
        cls.family = record  # type: ignore[attr-defined]
        return cls
    return register


def vision_families() -> list[HFFamily]:
    return [f for f in FAMILIES if not f.vlm]


def vlm_families() -> list[HFFamily]:
    return [f for f in FAMILIES if f.vlm]


def transformers_classes(*names: str) -> tuple[type, ...]:
    """The transformers classes of these names that the installed transformers has."""
    import transformers

    return tuple(cls for cls in (getattr(transformers, n, None) for n in names) if cls is not None)


def from_transformers(model: Any) -> bool:
    """Cheap pre-check (no transformers import): is any class in the model's MRO from transformers?"""
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)
