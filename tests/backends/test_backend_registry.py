"""Every adapter of every backend in the registry (surgery/backends/__init__.py: BACKENDS), run through
the whole method on its organism: the registry dispatches the model to that adapter, `find` recovers
the planted register neurons from the built-in calibration images, and the baked model equals the rule
written independently in tests/helpers/rule_reference.py, in float64. A new adapter without an organism here
fails `test_every_adapter_has_an_organism`."""
from __future__ import annotations

import copy
import importlib

import pytest
import torch

from tests.helpers.rule_reference import per_vector_relative, rule_reference
from surgery.organisms import vit as organism, eva as organism_eva, families as organism_families
from surgery.backends import BACKENDS, adapter_for
from surgery.backends.hf.family import FAMILIES, HFFamily, Organism, vision_families, vlm_families
from surgery.core.bake import bake_registers
from surgery.core.discovery import DiscoveryConfig, find_register_neurons
from surgery.core.images import builtin_images


def _visual(built):
    clip, planting = built
    return clip.visual, planting


def build_named_organism(named: Organism):
    """The organism an HF family record names (`"module:function"` + keyword arguments)."""
    module, function = named.builder.split(":")
    return getattr(importlib.import_module(module), function)(**named.kwargs)


def _hf_organism(record: HFFamily, name: str):
    return lambda tmp: build_named_organism(record.organisms[name])


ORGANISMS = {  # adapter name -> builder of (model the adapter handles, planting); tmp: a scratch folder
    "timm": lambda tmp: organism.build_timm_organism(0, "clip"),
    "timm_eva": lambda tmp: organism_eva.build_eva_organism(0, "dinov3"),
    "open_clip": lambda tmp: _visual(organism_families.build_open_clip_organism(0)),
    "open_clip_timm": lambda tmp: _visual(organism_eva.build_open_clip_timm_organism(tmp / "trunk", 0)),
    # HF vision families: the organism their record names (surgery/backends/hf/family.py)
    **{name: _hf_organism(f, name) for f in vision_families() for name in f.organisms},
}
ADAPTERS = {a.name: a for b in BACKENDS for a in b.adapters}
# Vision-language models: discovery needs the VLM's own image processor and the judge drops the register
# row in front of the projector, so they run find -> convert -> independent reference from folders written
# by save_pretrained, in tests/vlm/test_vlm.py (LLaVA and LLaVA-NeXT with CLIP and SigLIP towers, LLaVA-OneVision
# with SigLIP, PaliGemma).
VLM_ADAPTERS = {"hf_llava_clip", "hf_llava_siglip", "hf_llava_next_clip", "hf_llava_next_siglip",
                "hf_llava_onevision_siglip", "hf_paligemma"}


def test_every_adapter_has_an_organism():
    assert sorted(ORGANISMS) == sorted(set(ADAPTERS) - VLM_ADAPTERS)
    assert VLM_ADAPTERS <= set(ADAPTERS)
    assert VLM_ADAPTERS == {name for f in vlm_families() for name in f.organisms}  # built in tests/vlm/test_vlm.py


# The HF tables as they were written by hand before the family records (issue 33): the records must give
# the same loader / writer behaviour.
HAND_WRITTEN_MODEL_TYPES = {"clip": "CLIPModel", "clip_vision_model": "CLIPVisionModel", "dinov2": "Dinov2Model",
                            "dinov2_with_registers": "Dinov2WithRegistersModel", "dinov3_vit": "DINOv3ViTModel",
                            "siglip_vision_model": "SiglipVisionModel"}
HAND_WRITTEN_REMOTE = {c: "VitSurgery" + c for c in ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel",
                                                      "Dinov2Model", "Dinov2WithRegistersModel", "DINOv3ViTModel",
                                                      "SiglipVisionModel")}
HAND_WRITTEN_VLM_TYPES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                          "llava_onevision": "LlavaOnevisionForConditionalGeneration",
                          "paligemma": "PaliGemmaForConditionalGeneration"}


def test_hf_tables_are_the_family_records():
    """Every table the HF loaders and writers read is what the records say, family by family, and equals
    the hand-written tables it replaced; the remote-code template defines every record's remote class."""
    import transformers

    from surgery.backends.hf import loader, remote_modeling, vlm, vlm_loader, writer

    vision = vision_families()
    assert len(FAMILIES) == len(vision) + len(vlm_families()) and FAMILIES  # every record is one or the other
    assert list(loader.ADAPTERS) == [a for f in vision for a in f.adapters]  # registration = dispatch order
    assert list(vlm.VLM_ADAPTERS) == [a for f in vlm_families() for a in f.adapters]
    hf_backend = next(b for b in BACKENDS if b.name == "hf")
    assert set(hf_backend.adapters) == {a for f in FAMILIES for a in f.adapters}
    for f in FAMILIES:
        types = vlm_loader.VLM_MODEL_TYPES if f.vlm else loader.HF_MODEL_TYPES
        assert {t: types[t] for t in f.model_types} == dict(f.model_types)
        for stock in f.stock_classes:
            remote = f.remote_classes[stock]
            assert remote == "VitSurgery" + stock
            assert issubclass(getattr(remote_modeling, remote), getattr(transformers, stock)), remote
            if not f.vlm:
                assert writer.REMOTE_CLASSES[stock] == remote and stock in loader.SUPPORTED_CLASSES
        for stock in f.arch_classes:
            assert loader.HF_ARCH_CLASSES[stock] == stock
        for adapter in f.adapters:
            assert type(adapter).family is f and f.organisms[adapter.name].builder.startswith("surgery.organisms.")
    assert loader.HF_MODEL_TYPES == HAND_WRITTEN_MODEL_TYPES
    assert writer.REMOTE_CLASSES == HAND_WRITTEN_REMOTE
    assert vlm_loader.VLM_MODEL_TYPES == HAND_WRITTEN_VLM_TYPES
    assert loader.SUPPORTED_CLASSES == set(HAND_WRITTEN_REMOTE)


@pytest.mark.parametrize("name", sorted(n for f in vision_families() for n in f.organisms))
def test_an_hf_adapter_takes_exactly_the_classes_its_record_names(name):
    """The record's classes are what the adapter matches: its organism, of a record class, matches it and
    no other HF vision adapter."""
    model, _ = ORGANISMS[name](None)
    record = type(ADAPTERS[name]).family
    assert type(model).__name__ in record.stock_classes
    assert [a.name for f in vision_families() for a in f.adapters if a.matches(model)] == [name]


@pytest.mark.parametrize("name", sorted(set(ADAPTERS) - VLM_ADAPTERS))
@torch.no_grad()
def test_find_bake_and_the_rule_agree_for_every_adapter(name, tmp_path):
    model, planting = ORGANISMS[name](tmp_path)
    model.eval()
    fam = adapter_for(model)
    assert fam is ADAPTERS[name]
    result = find_register_neurons(model, builtin_images(), DiscoveryConfig(batch_size=8), adapter=fam, progress=False)
    planted = {int(k): sorted(v) for k, v in planting.neurons.items()}
    assert {k: sorted(v) for k, v in result.recipe.neurons.items()} == planted
    source = copy.deepcopy(model).double().eval()
    baked = bake_registers(copy.deepcopy(model), result.recipe, adapter=fam).double().eval()
    size = fam.input_size(model)[-1]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with rule_reference(source, result.recipe.neurons, family=fam):
        want = fam.forward_both(source, x)
    got = fam.forward_both(baked, x)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert float(per_vector_relative(g, w).max()) < 1e-9
