"""Real checkpoints as users have them: sources written by the libraries' own writers at real sizes
(random weights), served through a fake offline hub cache where the library reads from the hub.

Each row: `find` and `convert` (which reloads the output through the real loader and checks parity
against the float64 hooked reference) and `check`; then the output is loaded with the library's own
call, its heads and output shapes must equal the source's, and it must compute the rule
(tests/helpers/rule_reference.py) on the source in float64. ViT-B rows run by default, except three whose
behaviour a default test covers at organism size or in another row (each says which); ViT-L rows are slow.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from surgery.organisms.families import write_fake_hub_repo
from tests.helpers.rule_reference import per_vector_relative, rule_reference
from surgery.cli import main
from surgery.core.images import builtin_images
from tests.helpers import patch_offline_hub

EXACT = 1e-9  # float64 output against the float64 rule on the source


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """HF_HUB_CACHE -> an empty fake offline cache for the whole module (huggingface_hub reads its
    constants at import time, so they are patched as well as the environment)."""
    mp = pytest.MonkeyPatch()
    yield patch_offline_hub(mp, tmp_path_factory.mktemp("hub") / "cache")
    mp.undo()


@pytest.fixture(autouse=True)
def empty_hub_after_each_test(hub_cache):
    """Each test publishes its own ViT-B repo and reads only that one: emptied after the test, the cache
    holds one model at a time instead of every row's (several GB over the module)."""
    yield
    for entry in hub_cache.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


@pytest.fixture(scope="module")
def two_images(tmp_path_factory) -> Path:
    """Calibration for `find`: two images. Parity runs on the first one only (the budget: ViT-B in float64)."""
    d = tmp_path_factory.mktemp("two_images")
    for f in sorted(builtin_images().glob("*.png"))[:2]:
        shutil.copyfile(f, d / f.name)
    one = d / "parity"
    one.mkdir()
    shutil.copyfile(sorted(d.glob("*.png"))[0], one / "image.png")
    return d


def publish(cache: Path, repo: str, folder: Path) -> None:
    write_fake_hub_repo(cache, repo, {p.name: p for p in folder.iterdir() if p.is_file()})


def cli(args: list[Any]) -> None:
    code = main([str(a) for a in args])
    assert code == 0


def find_convert_check(spec: str, tmp: Path, images: Path, check: bool = False) -> tuple[Path, dict]:
    """find (absolute threshold: random weights have no outliers) -> convert (which reloads the output
    and checks parity) -> with `check`, the standalone check command too; returns OUT and the neurons."""
    neurons = tmp / "neurons.json"
    cli(["find", spec, "--images", images, "--out", neurons, "--threshold", "1e-6", "--max-layer", "1",
         "--top-k", "3", "--batch-size", "2", "--num-images", "2", "-q"])
    found = json.loads(neurons.read_text())["register_neurons"]
    assert sum(len(v) for v in found.values()) == 3 and all(int(k) <= 1 for k in found)
    out = tmp / "out"
    cli(["convert", spec, "--neurons", neurons, "--out", out, "--check-images", images / "parity", "-q"])
    assert json.loads((out / "parity.json").read_text())["parity"]["passed"]
    if check:
        cli(["check", out, "--images", images / "parity", "-q", "--report", tmp / "check.json"])
        assert json.loads((tmp / "check.json").read_text())["parity"]["passed"]
    return out, {int(k): v for k, v in found.items()}


def equals_the_rule(source: torch.nn.Module, baked: torch.nn.Module, neurons: dict, run: Callable, x: torch.Tensor,
                    family=None) -> None:
    """The output as the library loads it computes the rule on the source, in float64, vector by vector."""
    src64, baked64 = source.double().eval(), baked.double().eval()
    with torch.no_grad():
        with rule_reference(src64, neurons, family=family):
            want = run(src64, x.double())
        got = run(baked64, x.double())
    for w, g in zip(want, got):
        assert g.shape == w.shape
        assert float(per_vector_relative(g, w).max()) < EXACT


# ---- timm (save_for_hf) --------------------------------------------------------------------------

@dataclass
class TimmRow:
    name: str  # timm name with tag, as the hub repo timm/<name> is called
    kwargs: dict
    drop_model_args: bool = False  # repos pushed before timm wrote model_args
    label_names: bool = False
    serve: str = "hub"  # "hub" (hf-hub:timm/NAME) or "folder"
    classes: int = 0


TIMM_ROWS = [
    TimmRow("vit_base_patch16_clip_224.laion2b", {}, drop_model_args=True, classes=512),  # the README example
    # slow: the hub path with model_args and a head is the augreg_in1k row's, below
    pytest.param(TimmRow("vit_base_patch16_224.augreg_in21k", {}, classes=21843), marks=pytest.mark.slow),
    TimmRow("vit_base_patch16_224.augreg2_in21k_ft_in1k", {}, drop_model_args=True, label_names=True,
            serve="folder", classes=1000),  # num_classes only at the top level of config.json
    TimmRow("vit_base_patch16_224.mae", {"num_classes": 0}, serve="folder", classes=0),
    TimmRow("vit_base_patch16_224.augreg_in1k", {"dynamic_img_size": True, "num_classes": 10}, classes=10),
]
SLOW_TIMM_ROWS = [TimmRow("vit_large_patch14_clip_224.laion2b", {}, drop_model_args=True, classes=768)]


def _timm_row(row: TimmRow, hub_cache: Path, tmp: Path, images: Path) -> None:
    import timm

    import surgery  # noqa: F401  (registers the baked architecture with timm)

    torch.manual_seed(0)
    source = timm.create_model(row.name, pretrained=False, **row.kwargs).eval()
    assert source.num_classes == row.classes
    config = {"label_names": [f"class_{i}" for i in range(row.classes)]} if row.label_names else None
    folder = tmp / "source"
    timm.models.save_for_hf(source, folder, model_config=config, safe_serialization=True)
    cfg = json.loads((folder / "config.json").read_text())
    if row.drop_model_args:
        cfg.pop("model_args", None)
        (folder / "config.json").write_text(json.dumps(cfg))
    if row.serve == "hub":
        publish(hub_cache, f"timm/{row.name}", folder)
        spec = f"hf-hub:timm/{row.name}"
    else:
        spec = str(folder)
    out, neurons = find_convert_check(spec, tmp, images, check=row.drop_model_args and row.serve == "hub")
    user = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # the library's own call
    assert user.num_classes == source.num_classes and user.global_pool == source.global_pool
    assert tuple(user.pretrained_cfg["input_size"]) == tuple(source.pretrained_cfg["input_size"])
    if row.label_names:
        assert user.pretrained_cfg["label_names"] == config["label_names"]
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert user(x).shape == source(x).shape == (1, row.classes or source.num_features)
    reloaded = timm.create_model(spec if row.serve == "hub" else f"local-dir:{folder}", pretrained=True)

    def run(m, px):
        tokens = m.forward_features(px)
        return m.forward_head(tokens), tokens

    equals_the_rule(reloaded, user, neurons, run, x)
    if row.kwargs.get("dynamic_img_size"):  # other input sizes work, registers stay out of the grid
        equals_the_rule(reloaded, user, neurons, run, torch.randn(1, 3, 160, 128))


@pytest.mark.parametrize("row", TIMM_ROWS, ids=lambda r: r.name + ("-no-model-args" if r.drop_model_args else ""))
def test_timm_save_for_hf(row, hub_cache, tmp_path, two_images):
    _timm_row(row, hub_cache, tmp_path, two_images)


@pytest.mark.slow
@pytest.mark.parametrize("row", SLOW_TIMM_ROWS, ids=lambda r: r.name)
def test_timm_save_for_hf_large(row, hub_cache, tmp_path, two_images):
    _timm_row(row, hub_cache, tmp_path, two_images)


# ---- open_clip (hub layout: open_clip_config.json + weights) ----------------------------------------

class _NoTokenizerFiles:
    """ViT-B-16's text tower uses open_clip's built-in tokenizer: nothing to write."""

    def save_pretrained(self, _directory: Any) -> None:
        pass


@pytest.mark.parametrize("arch", ["ViT-B-16", pytest.param("ViT-L-14", marks=pytest.mark.slow)])
def test_open_clip_hub_layout(arch, hub_cache, tmp_path, two_images):
    import open_clip
    from open_clip.push_to_hf_hub import save_for_hf

    import surgery

    torch.manual_seed(0)
    clip = open_clip.create_model(arch, pretrained=None).eval()
    folder = tmp_path / "source"
    model_cfg = open_clip.get_model_config(arch)
    save_for_hf(clip, _NoTokenizerFiles(), model_cfg, str(folder), safe_serialization=True)
    repo = f"vit-surgery-test/{arch}-openclip"
    publish(hub_cache, repo, folder)
    spec = f"open_clip:hf-hub:{repo}"
    out, neurons = find_convert_check(spec, tmp_path, two_images)
    user, preprocess = surgery.open_clip_load(out)  # the documented call
    source, _, _ = open_clip.create_model_and_transforms(f"hf-hub:{repo}")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert user.encode_image(x).shape == source.encode_image(x).shape == (1, model_cfg["embed_dim"])
        text = open_clip.get_tokenizer(f"hf-hub:{repo}")(["a photo of a cat"])
        assert torch.equal(user.encode_text(text), source.encode_text(text))  # text tower untouched
    equals_the_rule(source.visual, user.visual, neurons, lambda m, px: (m(px),), x)


# ---- HF transformers (save_pretrained) ---------------------------------------------------------------

def _tiny_clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def _vit_b_vision(**extra):
    return dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=224, patch_size=16, **extra)


@dataclass
class HfRow:
    name: str
    build: Callable[[], tuple[Any, Any]]  # -> (model, processor to save next to it, or None)
    dtype: torch.dtype = torch.float32
    serve: str = "hub"
    to_timm: bool = False


def _clip_model():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    cfg = CLIPConfig(vision_config=_vit_b_vision(), projection_dim=512,
                     text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=64, max_position_embeddings=77))
    return CLIPModel(cfg), CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=_tiny_clip_tokenizer())


def _clip_vision_projection():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(**_vit_b_vision(), projection_dim=512)), CLIPImageProcessor()


def _dinov2(registers: int = 0):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, \
        Dinov2WithRegistersModel

    sizes = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 image_size=518, patch_size=14)
    model = (Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **sizes)) if registers
             else Dinov2Model(Dinov2Config(**sizes)))
    proc = BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return model, proc


HF_ROWS = [
    HfRow("CLIPModel-with-processor", _clip_model),
    HfRow("CLIPVisionModelWithProjection-fp16", _clip_vision_projection, dtype=torch.float16, serve="folder"),
    HfRow("Dinov2Model-518-crop224-bf16", _dinov2, dtype=torch.bfloat16, to_timm=True),
    # slow: the class is converted, checked and loaded at organism size by tests/backends/test_hf.py (dinov2_reg4)
    pytest.param(HfRow("Dinov2WithRegistersModel", lambda: _dinov2(4), serve="folder"), marks=pytest.mark.slow),
]

_SAFETENSORS_NAME = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _stored_dtype(path: Path) -> str:
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return header[sorted(k for k in header if k != "__metadata__")[0]]["dtype"]


@pytest.mark.parametrize("row", HF_ROWS, ids=lambda r: r.name)
def test_hf_save_pretrained(row, hub_cache, tmp_path, two_images):
    import transformers
    from transformers import AutoImageProcessor, AutoModel

    torch.manual_seed(0)
    model, processor = row.build()
    model = model.to(row.dtype).eval()
    folder = tmp_path / "source"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if row.serve == "hub":
        repo = f"vit-surgery-test/{row.name.lower()}"
        publish(hub_cache, repo, folder)
        spec = f"hf:{repo}"
    else:
        spec = str(folder)
    out, neurons = find_convert_check(spec, tmp_path, two_images, check=row.name.startswith("CLIPModel"))
    assert _stored_dtype(out / "model.safetensors") == _SAFETENSORS_NAME[row.dtype]  # source precision kept
    user = AutoModel.from_pretrained(out, trust_remote_code=True).eval()  # the library's own call
    source = type(model).from_pretrained(folder).eval()
    assert isinstance(user, type(source))
    assert user.dtype == row.dtype
    proc = AutoImageProcessor.from_pretrained(out)
    from PIL import Image

    img = Image.open(sorted(two_images.glob("*.png"))[0]).convert("RGB")
    px = proc(images=img, return_tensors="pt")["pixel_values"]
    assert px.shape[-2:] == (224, 224)  # the source's processor (DINOv2: 224-px crop of a 518-px model)
    if isinstance(source, transformers.CLIPModel):
        proc_full = transformers.CLIPProcessor.from_pretrained(out)  # tokenizer files travelled along
        batch = proc_full(text=["a cat"], images=img, return_tensors="pt")
        with torch.no_grad():
            got, want = user(**batch), source(**batch)
        assert got.logits_per_image.shape == want.logits_per_image.shape == (1, 1)
        assert got.image_embeds.shape == want.image_embeds.shape == (1, 512)
        hidden = got.vision_model_output.last_hidden_state, want.vision_model_output.last_hidden_state
        assert hidden[0].shape[1] == hidden[1].shape[1] + 1  # one register token
    else:
        with torch.no_grad():
            got = user(pixel_values=px.to(row.dtype))
            want = source(pixel_values=px.to(row.dtype))
        key = "image_embeds" if getattr(want, "image_embeds", None) is not None else "pooler_output"
        assert getattr(got, key).shape == getattr(want, key).shape
        assert got.last_hidden_state.shape[1] == want.last_hidden_state.shape[1] + 1  # one register token
    from surgery.backends import load_model

    src = load_model(spec)  # the source as vit-surgery's family sees it, float32
    baked = load_model(str(out))
    equals_the_rule(src.model, baked.model, neurons, src.adapter.forward_both, px.float(), family=src.adapter)
    if row.to_timm:
        import timm

        import surgery  # noqa: F401

        out_timm = tmp_path / "out_timm"
        cli(["convert", spec, "--to", "timm", "--neurons", tmp_path / "neurons.json", "--out", out_timm,
             "--check-images", two_images / "parity", "-q"])
        tm = timm.create_model(f"local-dir:{out_timm}", pretrained=True).eval()
        assert tm.pretrained_cfg["input_size"] == [3, 224, 224] or tuple(tm.pretrained_cfg["input_size"]) == (3, 224, 224)
        with torch.no_grad():
            assert tm.forward_features(px.float()).shape == baked.adapter.forward_tokens(baked.model.float(),
                                                                                        px.float()).shape


@pytest.mark.slow
def test_hf_dinov2_large(hub_cache, tmp_path, two_images):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, image_size=518, patch_size=14)).eval()
    folder = tmp_path / "source"
    model.save_pretrained(folder)
    publish(hub_cache, "vit-surgery-test/dinov2-large", folder)
    out, _ = find_convert_check("hf:vit-surgery-test/dinov2-large", tmp_path, two_images)
    assert (out / "modeling_vit_surgery.py").is_file()


# ---- DINOv2 torch-hub .pth -------------------------------------------------------------------------

@pytest.mark.slow  # the same .pth layout, at organism size: tests/backends/test_dinov2.py::test_hub_layout_convert_and_check
def test_dinov2_torch_hub_pth(tmp_path, two_images):
    import timm

    import surgery  # noqa: F401
    from surgery.organisms.families import timm_to_dinov2_hub

    torch.manual_seed(0)
    ref = timm.create_model("vit_base_patch14_dinov2", pretrained=False, img_size=518, num_classes=0).eval()
    path = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save(timm_to_dinov2_hub(ref), path)  # the release layout: blocks.i.*, ls1.gamma, mask_token
    out, neurons = find_convert_check(f"dinov2:{path}", tmp_path, two_images)
    user = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert user.num_classes == 0 and user.embed_dim == 768 and user.patch_embed.img_size == (518, 518)
    x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert user.forward_features(x).shape == (1, 1 + 1 + 37 * 37, 768)
