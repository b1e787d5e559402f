"""A hub-ready model card (README.md with YAML front matter) for every folder `convert` writes.

Front matter (huggingface_hub's own `ModelCardData`): `library_name` (timm / open_clip /
transformers), `base_model` and `license` when the source tells (timm's pretrained config, the source
folder's or hub-cache snapshot's own README front matter; never the network), `tags` (always
`vit-surgery`, `test-time-registers`, `vision-transformer`), `pipeline_tag`. Body: what was changed,
the parity numbers, the effect numbers and a usage snippet for that library. A README.md already
written by the library exporter (e.g. the HF token-layout notes) is kept as a section.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from surgery import __version__

CARD_FILE = "README.md"
TAGS = ["vit-surgery", "test-time-registers", "vision-transformer"]
LIBRARY_NAMES = {"timm": "timm", "open_clip": "open_clip", "hf": "transformers"}
PAPER = "https://arxiv.org/abs/2506.08010"


# ---- facts about the source, from local files only --------------------------------------------------

# A source's README is read by the model card only for license / base_model: a bounded read, and front
# matter with YAML aliases is ignored (an alias bomb expands to gigabytes in a few hundred bytes).
MAX_FRONT_MATTER_BYTES = 64 * 1024


def front_matter(readme: Path) -> dict[str, Any]:
    """The YAML front matter of a README (at most MAX_FRONT_MATTER_BYTES, no aliases, plain data only);
    {} when there is none or it is not acceptable."""
    import yaml

    with open(readme, "rb") as f:
        head = f.read(MAX_FRONT_MATTER_BYTES + 8)
    text = head.decode("utf-8", errors="replace")
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    end = next((i for i, ln in enumerate(lines[1:], 1) if ln.strip() == "---"), None)
    if end is None:  # no closing line within the cap: too long, or not front matter
        return {}
    block = "\n".join(lines[1:end])
    try:
        if any(isinstance(ev, yaml.AliasEvent) for ev in yaml.parse(block, Loader=yaml.SafeLoader)):
            return {}
        data = yaml.safe_load(block)
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _card_data_of(readme: Optional[Path]) -> dict[str, Any]:
    """license / base_model from a README's front matter; {} if none."""
    if readme is None or not readme.is_file():
        return {}
    try:
        return front_matter(readme)
    except OSError:  # an unreadable README tells us nothing
        return {}


def _cached_readme(repo_id: str) -> Optional[Path]:
    """README.md of a hub repo if it is already in the local hub cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id.strip("/"), "README.md")
    except Exception:  # an id huggingface_hub rejects: nothing cached
        return None
    return Path(hit) if isinstance(hit, str) else None


def _hub_id(source: dict[str, Any], model: Any) -> Optional[str]:
    """The hub repo the source weights came from, when the spec or the library's config says."""
    if source.get("base_model"):
        return str(source["base_model"])
    spec = str(source.get("spec") or source.get("converted_from") or "")
    library = source.get("library")
    if library == "timm":
        hub = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id")
        if hub:
            return str(hub)
        return spec[len("hf-hub:"):] if spec.startswith("hf-hub:") else None
    if library == "open_clip":
        name = str(source.get("model_name") or "")
        if name.startswith("hf-hub:"):
            return name[len("hf-hub:"):]
        if source.get("pretrained"):
            from open_clip.pretrained import get_pretrained_cfg

            hub = (get_pretrained_cfg(name, source["pretrained"]) or {}).get("hf_hub")
            return hub.strip("/") if hub else None
        return None
    if library == "hf":
        target = str(source.get("name_or_path") or "")
        return target if target.count("/") == 1 and not Path(target).exists() else None
    return None


def _local_source_dir(source: dict[str, Any]) -> Optional[Path]:
    spec = str(source.get("spec") or source.get("converted_from") or "")
    for prefix in ("hf:", "local-dir:", "open_clip:local-dir:"):
        if spec.startswith(prefix):
            spec = spec[len(prefix):]
    path = Path(spec) if spec else None
    return path if path is not None and path.is_dir() else None


def source_facts(source: dict[str, Any], model: Any) -> dict[str, Optional[str]]:
    """base_model and license of the source, as far as local files tell."""
    hub = _hub_id(source, model)
    readme = _cached_readme(hub) if hub else None
    local = _local_source_dir(source)
    if readme is None and local is not None:
        readme = local / CARD_FILE
    data = _card_data_of(readme)
    license_ = (source.get("pretrained_cfg") or {}).get("license") or data.get("license")
    return {"base_model": hub, "license": str(license_) if license_ else None}


def _is_vlm(model: Any) -> bool:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "vision_config", None) is not None and getattr(cfg, "text_config", None) is not None


def pipeline_tag(library: str, model: Any) -> str:
    if _is_vlm(model):
        return "image-text-to-text"  # a vision-language model whose vision tower was baked
    if library == "open_clip" or getattr(getattr(model, "config", None), "model_type", "") == "clip":
        return "zero-shot-image-classification"  # a whole CLIP (text tower included)
    if library == "timm" and int(getattr(model, "num_classes", 0) or 0) > 0 and \
            not (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "").count("clip"):
        return "image-classification"
    return "image-feature-extraction"


# ---- the card ------------------------------------------------------------------------------------

def _usage(library: str, surgery_doc: dict[str, Any]) -> str:
    p = surgery_doc["token_layout"]
    regs = p["register_indices"]
    first_patch = max(regs) + 1 if regs else p["num_prefix_tokens"]
    if library == "timm":
        return ("```python\nimport surgery, timm   # pip install vit-surgery; importing it registers the baked "
                "architecture\nmodel = timm.create_model(\"hf-hub:ORG/THIS_REPO\", pretrained=True).eval()  "
                "# or \"local-dir:PATH\"\ncfg = timm.data.resolve_data_config({}, model=model)\n"
                "transform = timm.data.create_transform(**cfg)\n"
                "features = model.forward_features(transform(image).unsqueeze(0))\n"
                f"patches = features[:, model.num_prefix_tokens:]   # register token(s) at index {regs} skipped\n```\n"
                "Plain timm without `import surgery` refuses the folder (`Unknown model (vit_surgery_baked)`) "
                "rather than loading an unfixed model.\n")
    if library == "open_clip":
        return ("```python\nimport huggingface_hub, surgery, open_clip   # pip install vit-surgery\n"
                "path = huggingface_hub.snapshot_download(\"ORG/THIS_REPO\")   # or a local folder\n"
                "model, preprocess = surgery.open_clip_load(path)   # a genuine open_clip CLIP\n"
                "tokenizer = open_clip.get_tokenizer(f\"local-dir:{path}\")\n"
                "image_features = model.encode_image(preprocess(image).unsqueeze(0))   # text tower untouched\n```\n"
                "Plain `open_clip.create_model_from_pretrained` refuses the folder (missing keys) rather than "
                "loading an unfixed model.\n")
    if surgery_doc.get("vlm"):
        vlm = surgery_doc["vlm"]
        return ("```python\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n"
                "model = AutoModelForImageTextToText.from_pretrained(\"ORG/THIS_REPO\", trust_remote_code=True)  "
                "# modeling_vit_surgery.py: torch + transformers only\n"
                "processor = AutoProcessor.from_pretrained(\"ORG/THIS_REPO\")   # the source's, unchanged\n"
                "inputs = processor(images=image, text=prompt, return_tensors=\"pt\")\n"
                "answer = processor.decode(model.generate(**inputs, max_new_tokens=64)[0])\n```\n"
                f"Only the vision tower (`{vlm['tower']}`) changed. The register token(s) live inside the tower "
                f"(tower token index {regs}) and are removed from its outputs before the VLM selects its image "
                f"features (vision_feature_layer {vlm['vision_feature_layer']!r}, strategy "
                f"{vlm['vision_feature_select_strategy']!r}): the number of image tokens, the processor, the chat "
                f"template, the language model and the projector are the source's ({vlm['unchanged_tensors']} "
                "tensors outside the tower, bit-identical).\n"
                "Without remote code: `pip install vit-surgery`, then `vit-surgery check PATH` rebuilds the stock "
                "transformers class with the fix baked in.\n")
    return ("```python\nfrom transformers import AutoImageProcessor, AutoModel\n"
            "model = AutoModel.from_pretrained(\"ORG/THIS_REPO\", trust_remote_code=True)  "
            "# modeling_vit_surgery.py: torch + transformers only\n"
            "processor = AutoImageProcessor.from_pretrained(\"ORG/THIS_REPO\")\n"
            "out = model(**processor(images=image, return_tensors=\"pt\"))\n"
            f"patches = out.last_hidden_state[:, {first_patch}:]   # register token(s) at index {regs}\n```\n"
            "Without remote code: `pip install vit-surgery`, then `surgery.load(path)` builds the stock "
            "transformers class with the fix baked in.\n")


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.2f} %"


def _num(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _effect_table(effect: Optional[dict[str, Any]]) -> str:
    if not effect:
        return "Not measured (converted with `--no-check`).\n"
    b, a = effect["before"], effect["after"]
    rows = [("patch tokens that are outliers (" + str(a.get("threshold_rule", "")) + ")",
             _pct(b["outlier_share"]), _pct(a["outlier_share"])),
            ("max / median patch-token norm", _num(b["max_over_median_patch_norm"]),
             _num(a["max_over_median_patch_norm"])),
            ("last-block CLS attention on the top 1 % of patches", _pct(b["cls_attention_top_patch_mass"]),
             _pct(a["cls_attention_top_patch_mass"])),
            ("CLS attention on the test-time register", "-", _pct(a.get("cls_attention_register_mass")))]
    return ("| | original | this model |\n|---|---|---|\n"
            + "".join(f"| {r[0]} | {r[1]} | {r[2]} |\n" for r in rows))


def _parity_text(parity: Optional[dict[str, Any]]) -> str:
    if not parity:
        return "Not checked (converted with `--no-check`): run `vit-surgery check DIR`.\n"
    worst = parity.get("worst") or {}
    return (f"{'PASS' if parity.get('passed') else 'FAIL'}: worst relative error "
            f"{float(worst.get('relative', 0.0)):.2e} (`{worst.get('name', '?')}`) against the hooked reference "
            f"(the paper's runtime intervention on the original weights), tolerance {parity.get('tolerance')}, "
            f"over {parity.get('images')} images; every block's residual stream, every output token and the "
            "pooled output are compared (`parity.json`).\n")


def render_model_card(library: str, source_model: Any, surgery_doc: dict[str, Any],
                      parity: Optional[dict[str, Any]], effect: Optional[dict[str, Any]],
                      library_notes: str = "") -> str:
    from huggingface_hub import ModelCard, ModelCardData

    facts = source_facts(surgery_doc.get("source") or {}, source_model)
    data = ModelCardData(library_name=LIBRARY_NAMES.get(library, library), license=facts["license"],
                         base_model=facts["base_model"], tags=list(TAGS),
                         pipeline_tag=pipeline_tag(library, source_model))
    recipe = surgery_doc["recipe"]
    neurons = recipe["register_neurons"]
    n_units = sum(len(v) for v in neurons.values())
    base = facts["base_model"] or surgery_doc.get("source_model", "the source model")
    layout = surgery_doc["token_layout"]
    body = (
        f"# {base} with baked test-time registers\n\n"
        f"This is `{surgery_doc.get('source_model')}` with the fix of *Vision Transformers Don't Need Trained "
        f"Registers* (Jiang et al., 2025, {PAPER}) written into its weights by "
        f"[vit-surgery](https://pypi.org/project/vit-surgery/) {surgery_doc.get('tool_version', __version__)}: "
        "no hooks, no training, any batch size, exportable.\n\n"
        "## What was changed\n\n"
        f"- {recipe['num_registers']} test-time register token(s) (a constant zero vector, no positional "
        f"embedding) enter before the pre-norm; they sit at token index {layout['register_indices']} "
        "(layout: `[CLS, trained registers, test-time registers, patches]`).\n"
        f"- {n_units} register neuron(s) in {len(neurons)} block(s) (block: units, 0-based): "
        f"`{json.dumps(neurons)}`. Each affected MLP is split into its ordinary units and a small register "
        f"branch; on the register token the branch writes {recipe.get('scale', 1)} x the signed maximum "
        f"of those units ({recipe.get('mode', 'shared')} mode), on patch tokens it writes 0, the CLS token is "
        "unchanged.\n- Every other weight is the source's, unchanged. The full recipe is in `surgery.json`.\n\n"
        "## Parity\n\n" + _parity_text(parity) + "\n"
        "## Effect (on the check images)\n\n" + _effect_table(effect) + "\n"
        "## Usage\n\n" + _usage(library, surgery_doc)
        + (f"\n## Notes\n\n{library_notes.strip()}\n" if library_notes.strip() else ""))
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def write_model_card(folder: Path, library: str, source_model: Any, surgery_doc: dict[str, Any],
                     parity: Optional[dict[str, Any]], effect: Optional[dict[str, Any]]) -> Path:
    """README.md in `folder`; a README the library exporter wrote there becomes the card's Notes section."""
    path = Path(folder) / CARD_FILE
    notes = ""
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        notes = "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines)
    path.write_text(render_model_card(library, source_model, surgery_doc, parity, effect, notes), encoding="utf-8")
    return path
