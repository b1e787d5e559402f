"""Every ```python snippet of the user docs (README.md and the docs site's user pages) runs as shown, on organisms.

The folders and names the snippets use are laid out first, the way the README's shell commands make
them: `hf-hub:timm/vit_base_patch16_clip_224.laion2b` is the timm organism in a fake offline hub cache,
`imgs/` and `calib/` organism images, `out/` (timm), `oc_out/` (open_clip), `hf_out/` (HF CLIP) and
`llava-fixed/` (LLaVA) converted folders. Each snippet then runs in its own namespace, in README order.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import patch_offline_hub
from surgery.organisms.families import write_fake_hub_repo

ROOT = Path(__file__).resolve().parents[2]
# the pages a user copies code from, in reading order (the contributing pages hold sketches, not recipes)
USER_DOCS = [ROOT / "README.md", ROOT / "docs" / "getting-started.md",
             *sorted((ROOT / "docs" / "guides").glob("*.md")), ROOT / "docs" / "reference" / "python-api.md"]
HUB_NAME = "timm/vit_base_patch16_clip_224.laion2b"
PLANTED = {2: [17, 101], 3: [42]}


def python_snippets(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


def doc_snippets() -> list[tuple[str, str]]:
    """(where, code) of every python snippet of USER_DOCS."""
    found = []
    for page in USER_DOCS:
        for i, code in enumerate(python_snippets(page.read_text(encoding="utf-8"))):
            found.append((f"{page.relative_to(ROOT).as_posix()} python snippet {i + 1}", code))
    return found


def test_the_readme_has_python_snippets_that_compile():
    snippets = doc_snippets()
    assert len(snippets) >= 5 and all(code.strip() for _, code in snippets)
    for where, code in snippets:
        compile(code, where, "exec")  # a SyntaxError names the snippet


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, calib_dir):
    import surgery
    from timm.models import save_for_hf

    import surgery.organisms.families as fams
    from surgery.organisms.vit import build_timm_organism
    from surgery.organisms.vlm import build_llava_organism, build_llava_processor, save_vlm_organism

    root = tmp_path_factory.mktemp("readme")
    neurons = root / "planted.json"
    neurons.write_text(json.dumps({"register_neurons": {str(k): v for k, v in PLANTED.items()}}))
    for name in ("imgs", "calib"):
        shutil.copytree(calib_dir, root / name)
    model, _ = build_timm_organism(0, "clip")
    save_for_hf(model, str(root / "src_timm"), safe_serialization=True)
    hub = root / "hub"
    write_fake_hub_repo(hub, HUB_NAME, {f: root / "src_timm" / f for f in ("config.json", "model.safetensors")})
    clip, _ = fams.build_open_clip_organism(0)
    hf_clip, _ = fams.build_hf_clip_organism(0)
    llava, _ = build_llava_organism(0)
    sources = {"oc_out": fams.save_open_clip_organism(clip, root / "src_oc"),
               "hf_out": fams.save_hf_organism(hf_clip, root / "src_hf"),
               "llava-fixed": save_vlm_organism(llava, build_llava_processor(), root / "src_llava")}
    with pytest.MonkeyPatch.context() as mp:
        patch_offline_hub(mp, hub)
        surgery.convert(f"hf-hub:{HUB_NAME}", root / "out", neurons=str(neurons))
        for out, src in sources.items():
            surgery.convert(str(src), root / out, neurons=str(neurons))
    return root, hub


@pytest.mark.slow  # four conversions and the snippets' own work: minutes on a loaded 2-core machine
def test_every_python_snippet_of_the_readme_runs_as_shown(workspace, monkeypatch):
    root, hub = workspace
    patch_offline_hub(monkeypatch, hub)
    monkeypatch.chdir(root)
    for i, (where, code) in enumerate(doc_snippets()):
        try:
            exec(compile(code, where, "exec"), {"__name__": f"doc_snippet_{i + 1}"})
        except Exception as e:  # which snippet, and the line in it
            raise AssertionError(f"{where} fails: {type(e).__name__}: {e}\n{code}") from e
