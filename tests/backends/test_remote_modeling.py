"""The HF remote-modeling file (`modeling_vit_surgery.py`, loaded with `trust_remote_code=True`) computes what
the core modules compute, for every HF class the writer supports and every recipe mode.

Each (family, mode) row builds a tiny HF organism with the library's own constructors, converts it with the
real convert path (`surgery.convert`, in-memory model -> `save_pretrained` -> loader -> core bake -> HF
writer), loads the output the way users do (`AutoModel.from_pretrained(DIR, trust_remote_code=True)`) and
runs the same pixels through it and through the organism baked in memory by `surgery.bake_registers`.
Both run in float64: they then compute the same real numbers, so every output tensor (last_hidden_state,
pooler_output, image_embeds, every hidden state, CLIP's logits ...) must agree to round-off (EXACT) and
the verdict cannot depend on any CPU's float32 kernels. The remote output is also judged against the
independent rule (tests/helpers/rule_reference.py) on the un-baked organism, and shown to differ from the rule
with the other mode (so a mode mix-up in the remote file would be caught).
"""
from __future__ import annotations

import ast
import copy
import inspect
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.rule_reference import per_vector_relative, rule_reference
from surgery.core.bake import bake_registers
from surgery.backends import adapter_for
from surgery.core.images import ImageBatches, list_images
from surgery.core.images import builtin_images
from surgery.organisms.eva import build_hf_dinov3_organism, build_hf_siglip_organism
from surgery.organisms.families import build_hf_clip_organism, build_hf_dinov2_organism
from surgery.core.recipe import Recipe

# float64 against float64 on the same weights and pixels: round-off (unit 1.1e-16, amplified by a
# 6-block network) stays below ~1e-13; a wrong register value, row, scale or mode moves the outputs by
# 1e-4 or more (asserted below for the mode), so a threshold anywhere in between separates them. Seen on
# this machine: equal outputs within 1.1e-15, the other mode's rule off by 8e-4 to 38.
EXACT = 1e-9
MODES = {
    "shared-R1": dict(num_registers=1, scale=1.0, mode="shared"),
    "shared-R3-scale0.5": dict(num_registers=3, scale=0.5, mode="shared"),
    "per_neuron-R2-scale2": dict(num_registers=2, scale=2.0, mode="per_neuron"),
}


def _clip_with_projection():
    """A `CLIPVisionModelWithProjection`: the CLIP organism's vision tower (planted neurons) plus a projection
    initialised by the class's own constructor."""
    from transformers import CLIPVisionModelWithProjection

    vision, planting = build_hf_clip_organism(0)
    torch.manual_seed(1)
    model = CLIPVisionModelWithProjection(vision.config)
    model.vision_model.load_state_dict(vision.state_dict())
    return model.eval(), planting


# family id -> (builder, stock class, prefix tokens before the test-time registers)
FAMILIES = {
    "CLIPVisionModel": (lambda: build_hf_clip_organism(0), "CLIPVisionModel", 1),
    "CLIPVisionModelWithProjection": (_clip_with_projection, "CLIPVisionModelWithProjection", 1),
    "CLIPModel": (lambda: build_hf_clip_organism(0, full_clip=True), "CLIPModel", 1),
    "Dinov2Model": (lambda: build_hf_dinov2_organism(0), "Dinov2Model", 1),
    "Dinov2Model-swiglu": (lambda: build_hf_dinov2_organism(0, swiglu=True), "Dinov2Model", 1),
    "Dinov2WithRegistersModel": (lambda: build_hf_dinov2_organism(0, num_register_tokens=4),
                                 "Dinov2WithRegistersModel", 5),
    "DINOv3ViTModel": (lambda: build_hf_dinov3_organism(0), "DINOv3ViTModel", 5),
    "DINOv3ViTModel-gated": (lambda: build_hf_dinov3_organism(0, gated=True), "DINOv3ViTModel", 5),
    "SiglipVisionModel": (lambda: build_hf_siglip_organism(0), "SiglipVisionModel", 0),
}


def test_every_class_of_every_hf_vision_family_has_a_row():
    """A family registered in surgery/backends/hf/family.py is written and loaded through its remote class
    here: a stock class of a record without a row above fails."""
    from surgery.backends.hf.family import vision_families

    assert {stock for _, stock, _ in FAMILIES.values()} == {c for f in vision_families() for c in f.stock_classes}


# The planted units of one block fire identically (shared and per-neuron maxima would coincide): ordinary units
# are added so that the modes differ, and a block without planted units is edited too.
EXTRA_UNITS = {1: [3], 2: [5]}
IMAGE_OUTPUTS = {None: ("last_hidden_state", "pooler_output"),  # compared with every other output tensor too
                 "CLIPVisionModelWithProjection": ("last_hidden_state", "image_embeds"),
                 "CLIPModel": ("image_embeds", "vision_model_output.last_hidden_state",
                               "vision_model_output.pooler_output")}
TEXT_IDS = torch.tensor([[49406, 320, 49407], [49406, 1929, 49407]])  # CLIPModel's forward needs a text


@pytest.fixture(scope="module", autouse=True)
def modules_cache(tmp_path_factory):
    """trust_remote_code copies modeling files into transformers' module cache: keep it in a temporary folder."""
    import transformers.dynamic_module_utils as dmu

    path = str(tmp_path_factory.mktemp("hf_modules"))
    saved, saved_path = dmu.HF_MODULES_CACHE, list(sys.path)
    dmu.HF_MODULES_CACHE = path
    yield Path(path)
    dmu.HF_MODULES_CACHE = saved
    sys.path[:] = saved_path


@pytest.fixture(scope="module")
def organisms():
    return {}


def _organism(cache: dict, family: str):
    if family not in cache:
        cache[family] = FAMILIES[family][0]()
    return cache[family]


def _pixels(model) -> torch.Tensor:
    """Four of the built-in calibration images (they carry the organisms' outlier triggers), float64."""
    files = list_images(builtin_images())[:4]
    tf = adapter_for(model).data_transform(model)
    return torch.cat([x for x, _ in ImageBatches(files, tf, 4, progress=False)]).double()


def _flat(out, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a transformers output object (nested outputs and hidden-state tuples included)."""
    flat: dict[str, torch.Tensor] = {}
    items = out.items() if hasattr(out, "items") else enumerate(out)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            flat[name] = value
        elif value is not None and (hasattr(value, "items") or isinstance(value, (tuple, list))):
            flat.update(_flat(value, name + "."))
    return flat


def _forward(model, stock: str, x: torch.Tensor):
    if stock == "CLIPModel":
        return model(pixel_values=x, input_ids=TEXT_IDS, output_hidden_states=True, return_dict=True)
    return model(pixel_values=x, output_hidden_states=True, return_dict=True)


def _worst(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    if want.dim() == 1:
        got, want = got[None], want[None]
    return float(per_vector_relative(got, want).max())


def _convert(model, recipe: Recipe, out: Path) -> Path:
    """The real convert path; the parity check is skipped because this test judges the output itself."""
    import surgery

    nf = out.with_suffix(".neurons.json")
    nf.write_text(json.dumps({"register_neurons": recipe.to_dict()["register_neurons"]}))
    surgery.convert(model, out, neurons=nf, num_registers=recipe.num_registers, scale=recipe.scale, mode=recipe.mode,
                    check=False)
    return out


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_remote_model_equals_the_core_bake(family, mode, organisms, tmp_path):
    from transformers import AutoModel

    model, planting = _organism(organisms, family)
    _, stock, prefix = FAMILIES[family]
    fam = adapter_for(model)
    neurons = {b: list(planting.neurons.get(b, [])) + EXTRA_UNITS.get(b, []) for b in {*planting.neurons, *EXTRA_UNITS}}
    recipe = Recipe(neurons).with_options(**MODES[mode])
    out = _convert(model, recipe, tmp_path / f"{family}-{mode}".replace(".", "_"))

    remote = AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()
    assert type(remote).__name__ == "VitSurgery" + stock.split("-")[0]
    assert next(remote.parameters()).dtype == torch.float32
    R = recipe.num_registers
    assert remote.register_token_indices == list(range(prefix, prefix + R))
    split = [m for m in remote.modules() if type(m).__name__ == "RegisterMlp"]
    assert len(split) == len(recipe.neurons)  # the written file's own RegisterMlp, not vit-surgery's import
    assert all(type(m).__module__.startswith("transformers_modules.") for m in split)
    remote = remote.double()
    core = bake_registers(copy.deepcopy(model), recipe, adapter=fam).double().eval()
    x = _pixels(model)

    got, want = _flat(_forward(remote, stock, x)), _flat(_forward(core, stock, x))
    assert sorted(got) == sorted(want) and set(IMAGE_OUTPUTS.get(stock, IMAGE_OUTPUTS[None])) <= set(got)
    errors = {k: _worst(got[k], want[k]) for k in want}
    assert max(errors.values()) < EXACT, {k: e for k, e in errors.items() if e >= EXACT}

    # the independent rule, on the un-baked organism; and the same rule with the other mode must differ
    source = copy.deepcopy(model).double().eval()
    pooled, tokens = fam.forward_both(remote, x)
    other = "shared" if recipe.mode == "per_neuron" else "per_neuron"
    for per_neuron, should_match in ((recipe.mode == "per_neuron", True), (other == "per_neuron", False)):
        with rule_reference(source, recipe.neurons, num_registers=R, scale=recipe.scale, per_neuron=per_neuron,
                            family=fam):
            ref_pooled, ref_tokens = fam.forward_both(source, x)
        err = max(_worst(pooled, ref_pooled), _worst(tokens, ref_tokens))
        assert (err < EXACT) if should_match else (err > 1e-4), (per_neuron, err)


CORE_NAMES = ("register_rows", "register_edit", "PrependRegisters", "MlpWeights", "RegisterMlp")


@pytest.fixture(scope="module")
def written(organisms, tmp_path_factory) -> Path:
    model, planting = _organism(organisms, "Dinov2WithRegistersModel")
    out = tmp_path_factory.mktemp("written") / "out"
    return _convert(model, Recipe(planting.neurons).with_options(num_registers=2, mode="per_neuron"), out)


def test_written_file_holds_the_core_source_and_imports_only_torch_and_transformers(written):
    """No hand copy that could drift: each core definition appears in modeling_vit_surgery.py verbatim."""
    import surgery.core.modules as core

    text = (written / "modeling_vit_surgery.py").read_text()
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert {a.name.split(".")[0] for a in node.names} <= {"torch", "transformers", "dataclasses", "sys", "typing"}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module.split(".")[0] in {"__future__", "torch", "transformers",
                                                                     "dataclasses", "sys", "typing"}, node.module
    lines = text.splitlines()
    for name in CORE_NAMES:
        node = next(n for n in tree.body if getattr(n, "name", None) == name)
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        assert "\n".join(lines[first - 1:node.end_lineno]) == inspect.getsource(getattr(core, name)).rstrip("\n"), name
    assert len([n for n in tree.body if getattr(n, "name", None) == "RegisterMlp"]) == 1


def test_written_file_runs_where_vit_surgery_cannot_be_imported(written):
    """The folder works for a user without vit-surgery: `surgery` / `exporters` imports are made to fail."""
    import subprocess

    script = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("surgery", "exporters"):
            raise ImportError("vit-surgery is not installed here: " + name)
sys.meta_path.insert(0, Block())
import torch
from transformers import AutoModel
import transformers.dynamic_module_utils as dmu
dmu.HF_MODULES_CACHE = {str(written.parent / "modules")!r}
model = AutoModel.from_pretrained({str(written)!r}, trust_remote_code=True).eval()
with torch.no_grad():
    out = model(pixel_values=torch.zeros(2, 3, 64, 64))
assert out.last_hidden_state.shape == (2, 5 + 2 + 64, model.config.hidden_size), out.last_hidden_state.shape
assert not any(m.startswith(("surgery", "exporters")) for m in sys.modules)
print("ok", type(model).__name__)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=str(written.parent))
    assert run.returncode == 0 and run.stdout.strip() == "ok VitSurgeryDinov2WithRegistersModel", run.stderr[-2000:]
