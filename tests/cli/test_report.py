"""inspect (before/after report) and eval (k-NN accuracy) on the CLIP-style organism."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from surgery.cli import main
from surgery.core.errors import ImageInputError, ModelInputError
from surgery.report.knn_eval import dataset_split, run_eval
from surgery.organisms.vit import DEFAULT_PLANT, organism_image
from surgery.report import PNG_FILES, write_report

PLANTED = {layer: sorted(u for u, _ in units) for layer, units in DEFAULT_PLANT.items()}


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, organism_dir, baked_dir, calib_dir) -> Path:
    out = tmp_path_factory.mktemp("report") / "report"
    write_report(str(organism_dir), str(baked_dir), calib_dir, out, progress=False)
    return out


@pytest.fixture(scope="module")
def summary(report_dir) -> dict:
    return json.loads((report_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A two-class ImageFolder of organism-style images (warm vs cool tint), triggers included."""
    root = tmp_path_factory.mktemp("dataset")
    rng = np.random.default_rng(7)
    for cls, shift in (("cool", (-0.12, 0.0, 0.12)), ("warm", (0.12, 0.0, -0.12))):
        (root / cls).mkdir()
        for i in range(12):
            a = np.asarray(organism_image(rng, n_triggers=int(rng.integers(1, 3)))).astype(float) / 255
            trig = (a == 0) | (a == 1)
            a = np.where(trig, a, np.clip(a + np.array(shift), 0, 1))
            Image.fromarray((a * 255).round().astype(np.uint8)).save(root / cls / f"{i:02d}.png")
    return root


# ---- report files ---------------------------------------------------------------------------------

def test_report_files_exist_and_pngs_decode(report_dir, summary):
    for name in ("report.html", "summary.json", *PNG_FILES):
        assert (report_dir / name).is_file(), name
        assert name in summary["files"]
    for name in PNG_FILES:
        with Image.open(report_dir / name) as img:
            assert img.format == "PNG"
            img.load()
            assert img.width >= 400 and img.height >= 300
            assert np.asarray(img.convert("L")).std() > 5  # not a blank canvas


def test_html_is_self_contained(report_dir):
    text = (report_dir / "report.html").read_text(encoding="utf-8")
    assert "http:" not in text and "https:" not in text and "file:" not in text
    assert "<script" not in text and "<link" not in text and "url(" not in text and "@import" not in text
    srcs = re.findall(r'src\s*=\s*["\']?([^"\'\s>]*)', text)
    assert len(srcs) == len(PNG_FILES)
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.findall(r"href\s*=", text)
    # every embedded picture is one of the PNG files written next to the page
    import base64

    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    assert embedded == {(report_dir / n).read_bytes() for n in PNG_FILES}


def test_summary_numbers_match_the_organism(summary):
    before, after = summary["metrics"]["original"], summary["metrics"]["baked"]
    assert before["outlier_share"] > 0.01
    assert after["outlier_share"] == 0.0
    assert before["max_over_median_patch_norm"] > 10 and after["max_over_median_patch_norm"] < 1.5
    assert before["cls_attention_top_patch_mass"] > 0.3 and after["cls_attention_top_patch_mass"] < 0.05
    assert after["cls_attention_register_mass"] > 0.5  # the sink moved onto the register
    assert before["cls_attention_register_mass"] is None
    assert after["register_norm"] > 10 * after["median_patch_norm"]
    assert after["cls_patch_attention_entropy"] > before["cls_patch_attention_entropy"]
    for m in (before, after):
        assert np.isfinite(m["cls_attention_entropy"])
    cos = summary["pooled_cosine_similarity"]
    assert len(cos["per_image"]) == summary["num_images"] == 24
    assert 0.999 < cos["min"] <= cos["mean"] <= 1.0 + 1e-9
    assert summary["register_indices"] == [1]
    assert summary["outliers_appear_at_block"] == min(PLANTED)  # the first planted block
    assert summary["recipe"]["register_neurons"] == {str(k): v for k, v in PLANTED.items()}
    trace = summary["layer_norms"]
    assert len(trace["original"]["max"]) == len(trace["baked"]["max"]) == summary["depth"]
    assert trace["original"]["max"][-1] > 10 * trace["baked"]["max"][-1]
    assert trace["baked"]["register"][-1] > 10 * trace["baked"]["median"][-1]


def test_ranking_comes_from_the_discovery_record(summary, baked_dir):
    r = summary["ranking"]
    assert r["source"].startswith(str(baked_dir / "neurons.json"))
    assert r["cut"] == sum(len(v) for v in PLANTED.values())
    assert {(e["layer"], e["unit"]) for e in r["top"][: r["cut"]]} == {(k, u) for k, v in PLANTED.items() for u in v}
    scores = [e["score"] for e in r["top"]]
    assert scores == sorted(scores, reverse=True)


def test_html_shows_the_numbers(report_dir, summary):
    text = (report_dir / "report.html").read_text(encoding="utf-8")
    b = summary["metrics"]["original"]["outlier_share"]
    assert f"{b:.2%}" in text and "0.00%" in text
    for label in ("outlier share", "max / median", "top 1 %", "entropy", "cosine similarity", "register"):
        assert label in text


# ---- inspect variants -----------------------------------------------------------------------------

def test_inspect_converted_folder_alone(tmp_path, baked_dir, calib_dir, capsys):
    out = tmp_path / "r"
    assert main(["inspect", str(baked_dir), "--images", str(calib_dir), "--out", str(out), "-q", "--show", "2"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert "un-baked" in s["original"] and s["baked"] == str(baked_dir)
    assert s["metrics"]["original"]["outlier_share"] > 0 and s["metrics"]["baked"]["outlier_share"] == 0
    assert "wrote" in capsys.readouterr().out
    # an existing report folder is not replaced without --overwrite
    assert main(["inspect", str(baked_dir), "--images", str(calib_dir), "--out", str(out), "-q"]) == 8
    assert not list(tmp_path.glob(".r.partial-*"))


def test_inspect_plain_model_bakes_in_memory(tmp_path, organism_dir, calib_dir):
    out = tmp_path / "r"
    write_report(str(organism_dir), None, calib_dir, out, progress=False, show=1, num_images=12)
    s = json.loads((out / "summary.json").read_text())
    assert "in memory" in s["baked_side"] and s["baked"] == "in memory"
    assert s["recipe"]["register_neurons"] == {str(k): v for k, v in PLANTED.items()}
    assert s["num_images"] == 12
    assert s["metrics"]["baked"]["outlier_share"] == 0.0
    assert s["ranking"]["source"] == "discovery on the report images"


def test_inspect_plain_model_with_nothing_to_fix(tmp_path, organism_dir, calib_dir):
    out = tmp_path / "r"
    write_report(str(organism_dir), None, calib_dir, out, progress=False, threshold=1e6, show=1)
    s = json.loads((out / "summary.json").read_text())
    assert s["baked"] is None and "baked" not in s["metrics"] and s["notes"]
    assert (out / "report.html").is_file() and not (out / "neuron_ranking.png").exists()
    with Image.open(out / "norm_maps.png") as img:
        img.load()


def test_inspect_errors(tmp_path, organism_dir, calib_dir):
    assert main(["inspect", str(organism_dir), "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "r"),
                 "-q"]) == 3
    assert main(["inspect", str(tmp_path / "missing"), "--images", str(calib_dir), "--out", str(tmp_path / "r"),
                 "-q"]) == 4
    assert not (tmp_path / "r").exists()


def test_demo_ends_with_the_report(tmp_path):
    from surgery.demo import run_demo

    out = tmp_path / "demo"
    assert run_demo(out, quiet=True) == 0
    s = json.loads((out / "report" / "summary.json").read_text())
    assert s["metrics"]["baked"]["outlier_share"] == 0.0 and s["metrics"]["original"]["outlier_share"] > 0
    assert s["original"] == "../source_model" and s["baked"] == "../baked"  # no temporary folder names
    assert ".partial-" not in (out / "report" / "report.html").read_text()
    assert s["ranking"]["source"].endswith("neurons.json")


# ---- eval -----------------------------------------------------------------------------------------

def test_eval_accuracy_before_and_after(organism_dir, baked_dir, dataset):
    res = run_eval(str(organism_dir), str(baked_dir), dataset, k=5, progress=False)
    assert res.query_images > 0 and res.gallery_images > res.query_images
    assert 0.0 <= res.top1_original <= 1.0 and 0.0 <= res.top1_baked <= 1.0
    assert res.top1_original > 0.75  # the classes are separable for the organism
    assert abs(res.top1_baked - res.top1_original) <= 0.05 + 1e-9
    assert res.prediction_agreement >= 0.95
    assert res.feature_cosine_min > 0.999
    d = res.to_dict()
    assert set(d["per_class"]) == {"cool", "warm"}


def test_eval_cli_json_and_converted_alone(tmp_path, organism_dir, baked_dir, dataset, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(organism_dir), str(baked_dir), "--dataset", str(dataset), "--k", "5", "-q",
                 "--json", str(out)]) == 0
    first = json.loads(out.read_text())
    assert "k-NN top-1" in capsys.readouterr().out
    assert main(["eval", str(baked_dir), "--dataset", str(dataset), "--k", "5", "-q", "--json", str(out),
                 "--overwrite"]) == 0
    second = json.loads(out.read_text())
    for key in ("top1_original", "top1_baked", "gallery_images", "query_images"):
        assert first[key] == pytest.approx(second[key], abs=1e-6)


def test_eval_split_is_deterministic(dataset):
    a, b = dataset_split(dataset, 0.25, seed=3), dataset_split(dataset, 0.25, seed=3)
    assert a.query == b.query and a.gallery == b.gallery
    assert {p for p, _ in a.query}.isdisjoint({p for p, _ in a.gallery})
    assert len(a.query) == 2 * 3 and len(a.gallery) == 2 * 9
    c = dataset_split(dataset, 0.25, seed=4)
    assert c.query != a.query


def test_eval_predefined_split(tmp_path, dataset):
    import shutil

    for split, sl in (("train", slice(0, 8)), ("val", slice(8, 12))):
        for cls in ("cool", "warm"):
            (tmp_path / split / cls).mkdir(parents=True)
            for f in sorted((dataset / cls).iterdir())[sl]:
                shutil.copy(f, tmp_path / split / cls / f.name)
    s = dataset_split(tmp_path)
    assert len(s.gallery) == 16 and len(s.query) == 8 and "predefined" in s.rule


def test_eval_bad_dataset_folders(tmp_path, organism_dir, baked_dir, dataset):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(one / "a.png")
    Image.new("RGB", (8, 8)).save(one / "b.png")
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    Image.new("RGB", (8, 8)).save(empty / "a" / "x.png")
    single = tmp_path / "single"
    for c, n in (("a", 3), ("b", 1)):
        (single / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(single / c / f"{i}.png")
    cases = {tmp_path / "missing": "not found", flat: "no class folders", tmp_path / "one": "only one class",
             empty: "no image files", single: "at least 2"}
    for folder, msg in cases.items():
        with pytest.raises(ImageInputError, match=msg):
            dataset_split(folder)
    assert main(["eval", str(organism_dir), str(baked_dir), "--dataset", str(flat), "-q"]) == 3
    with pytest.raises(ModelInputError, match="no baked test-time registers"):
        run_eval(str(organism_dir), None, dataset, progress=False)


def test_inspect_model_without_cls(tmp_path, calib_dir):
    """Attention-pool models (SigLIP style) have no CLS row: the patches' mean attention is used."""
    from surgery.demo import save_organism
    from surgery.organisms.vit import build_timm_organism

    model, planting = build_timm_organism(0, "siglip")
    src = save_organism(model, tmp_path / "siglip")
    out = tmp_path / "r"
    write_report(str(src), None, calib_dir, out, progress=False, show=2, num_images=12)
    s = json.loads((out / "summary.json").read_text())
    assert "no CLS" in s["attention_query"] and any("no CLS" in n for n in s["notes"])
    assert s["recipe"]["register_neurons"] == {str(k): v for k, v in planting.neurons.items()}
    assert s["metrics"]["original"]["outlier_share"] > 0 and s["metrics"]["baked"]["outlier_share"] == 0.0
    assert s["metrics"]["baked"]["cls_attention_register_mass"] > 0.5
