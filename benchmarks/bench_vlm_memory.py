"""`vit-surgery convert` of VLMs at the size people download them: wall time and peak RSS.

Each row is a VLM folder laid out as the hub holds it (float16, ~5 GB shards + model.safetensors.index.json,
the hub's legacy tensor names `language_model.model.*`, `language_model.lm_head.weight`,
`vision_tower.vision_model.*`, `multi_modal_projector.*`), built here with random weights: the model is
constructed on the meta device for its names and shapes, and each shard is written tensor by tensor
from a pool of random float16 values (memory: one tensor). The processor is the organism's (tokenizer
with `<image>`) with the real image size. Then `convert SRC --neurons n.json --out OUT` runs in a child
process (its own parity check included); its peak RSS comes from wait4's rusage.

Rows (shapes as released; vocabularies as in the hub configs):
  llava15_7b    LLaVA-1.5-7B: CLIP ViT-L/14-336 tower, projector 1024->4096->4096, Llama-2-7B (32 x 4096, MLP 11008)
  llava15_13b   LLaVA-1.5-13B: the same tower, Llama-2-13B (40 x 5120, MLP 13824)
  llava_next_7b LLaVA-NeXT-7B (Mistral): the same tower, any-resolution tiles, Mistral-7B (32 x 4096, MLP 14336, GQA 8)
  onevision_7b  LLaVA-OneVision-7B: SigLIP so400m/14-384 tower (27 x 1152, MLP 4304), Qwen2-7B (28 x 3584, vocab 152064)
  paligemma_3b  PaliGemma-3B: SigLIP so400m/14-224 tower, Gemma-2B (18 x 2048, MLP 16384, vocab 257216)

  /work/venv/bin/python benchmarks/bench_vlm_memory.py --rows llava15_7b --write
  /work/venv/bin/python benchmarks/bench_vlm_memory.py --rows llava15_7b --keep   # keep the ~14 GB folder
  /work/venv/bin/python benchmarks/bench_vlm_memory.py --rows llava15_7b --find 64 --keep  # `find`, 64 images

The folders are deleted after each row unless --keep (they are 6-16 GB each).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.benchlib import command_line, load_average, machine, today, write_section  # noqa: E402

GiB = 2 ** 30
SHARD_BYTES = 5 * 10 ** 9
CLIP_L336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     patch_size=14, hidden_act="gelu_pytorch_tanh")
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
ROWS = {
    "llava15_7b": dict(kind="llava", tower="clip", vision=CLIP_L336, text=("llama", LLAMA2_7B)),
    "llava15_13b": dict(kind="llava", tower="clip", vision=CLIP_L336,
                        text=("llama", dict(LLAMA2_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                            num_attention_heads=40, num_key_value_heads=40))),
    "llava_next_7b": dict(kind="llava_next", tower="clip", vision=CLIP_L336,
                          text=("mistral", dict(LLAMA2_7B, intermediate_size=14336, num_key_value_heads=8))),
    "onevision_7b": dict(kind="llava_onevision", tower="siglip", vision=dict(SIGLIP_SO400M, image_size=384),
                         text=("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                             num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                             max_position_embeddings=32768))),
    "paligemma_3b": dict(kind="paligemma", tower="siglip", vision=dict(SIGLIP_SO400M, image_size=224),
                         text=("gemma", dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                                             num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                                             vocab_size=257216, max_position_embeddings=8192))),
    # a small shape to try the script itself
    "tiny": dict(kind="llava", tower="clip", vision=dict(CLIP_L336, num_hidden_layers=4, image_size=112),
                 text=("llama", dict(LLAMA2_7B, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4))),
}
NEURONS = {"10": [1, 2, 3], "12": [7]}  # two tower blocks, as a user's neurons file would list
IMAGE_TOKEN_ID = 4  # the organism tokenizer's `<image>`
GRID = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _config(row: dict):
    import transformers

    from surgery.organisms.vlm import _text_config

    name, text = row["text"]
    text_cfg = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                "qwen2": transformers.Qwen2Config, "gemma": transformers.GemmaConfig}[name](
        **dict(text, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    vision = (transformers.CLIPVisionConfig if row["tower"] == "clip" else transformers.SiglipVisionConfig)(**row["vision"])
    common = dict(vision_config=vision.to_dict(), text_config=text_cfg.to_dict())
    kind = row["kind"]
    if kind == "llava":
        cfg = transformers.LlavaConfig(**common, image_token_id=IMAGE_TOKEN_ID, vision_feature_select_strategy="default",
                                       vision_feature_layer=-2, projector_hidden_act="gelu")
    elif kind == "llava_next":
        cfg = transformers.LlavaNextConfig(**common, image_token_id=IMAGE_TOKEN_ID, image_grid_pinpoints=GRID,
                                           vision_feature_select_strategy="default", vision_feature_layer=-2)
    elif kind == "llava_onevision":
        cfg = transformers.LlavaOnevisionConfig(**common, image_token_index=IMAGE_TOKEN_ID, video_token_index=5,
                                                image_grid_pinpoints=[[384, 384], [384, 768], [768, 384]],
                                                vision_feature_select_strategy="full", vision_feature_layer=-1)
    else:
        cfg = transformers.PaliGemmaConfig(**common, image_token_index=IMAGE_TOKEN_ID,
                                           projection_dim=text["hidden_size"], hidden_size=text["hidden_size"])
    del _text_config
    cfg.dtype = "float16"
    return cfg


def _processor(row: dict):
    import transformers

    from surgery.organisms.vlm import CHAT_TEMPLATE, IMAGE_TOKEN, build_tokenizer

    size = row["vision"]["image_size"]
    mean, std = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]) if row["tower"] == "clip" \
        else ([0.5] * 3, [0.5] * 3)
    kind = row["kind"]
    if kind == "llava":
        ip = transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                             image_mean=mean, image_std=std)
        return transformers.LlavaProcessor(image_processor=ip, tokenizer=build_tokenizer(), patch_size=14,
                                           vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                           image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)
    if kind == "llava_next":
        ip = transformers.LlavaNextImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                                  image_mean=mean, image_std=std, image_grid_pinpoints=GRID)
        return transformers.LlavaNextProcessor(image_processor=ip, tokenizer=build_tokenizer(), patch_size=14,
                                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                               image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)
    if kind == "llava_onevision":
        ip = transformers.LlavaOnevisionImageProcessor(size={"height": size, "width": size}, image_mean=mean,
                                                       image_std=std,
                                                       image_grid_pinpoints=[[384, 384], [384, 768], [768, 384]])
        vp = transformers.LlavaOnevisionVideoProcessor(size={"height": size, "width": size}, image_mean=mean, image_std=std)
        return transformers.LlavaOnevisionProcessor(image_processor=ip, tokenizer=build_tokenizer(), video_processor=vp,
                                                    num_image_tokens=(size // 14) ** 2,
                                                    vision_feature_select_strategy="full", image_token=IMAGE_TOKEN,
                                                    chat_template=CHAT_TEMPLATE)
    ip = transformers.SiglipImageProcessor(size={"height": size, "width": size}, image_mean=mean, image_std=std)
    ip.image_seq_length = (size // 14) ** 2
    return transformers.PaliGemmaProcessor(image_processor=ip, tokenizer=build_tokenizer())


def hub_name(name: str) -> str:
    """The hub's legacy tensor name of a transformers 5 state-dict name (the llava-hf repos' layout)."""
    for new, old in (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower.vision_model."),
                     ("model.multi_modal_projector.", "multi_modal_projector."), ("model.image_newline", "image_newline")):
        if name.startswith(new):
            return old + name[len(new):]
    return name


def build(row_name: str, folder: Path) -> int:
    """Write the row's VLM folder; returns its weight bytes."""
    import torch
    import transformers

    from surgery.backends.hf.vlm_stream import parameters_on_meta

    row = ROWS[row_name]
    cfg = _config(row)
    cls = {"llava": transformers.LlavaForConditionalGeneration,
           "llava_next": transformers.LlavaNextForConditionalGeneration,
           "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration,
           "paligemma": transformers.PaliGemmaForConditionalGeneration}[row["kind"]]
    with parameters_on_meta():
        model = cls(cfg)
    shapes: dict[str, tuple[int, ...]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():  # tied weights once (the first name), as save_pretrained does
        if id(p) not in seen:
            seen.add(id(p))
            shapes[hub_name(name)] = tuple(p.shape)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(1 << 26, generator=gen) * 0.02).to(torch.float16)  # 64 Mi values, reused at random offsets
    names = sorted(shapes)
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nbytes = 2 * int(torch.Size(shapes[n]).numel())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for n in shard:
            nbytes = 2 * int(torch.Size(shapes[n]).numel())
            header[n] = {"dtype": "F16", "shape": list(shapes[n]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[n] = file
        total += offset
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(folder / file, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for n in shard:
                count = int(torch.Size(shapes[n]).numel())
                if n.endswith(("norm.weight", "layernorm.weight", "layer_norm1.weight", "layer_norm2.weight")):
                    t = torch.ones(count, dtype=torch.float16)
                else:
                    reps = -(-count // pool.numel())
                    start = int(torch.randint(0, reps * pool.numel() - count + 1, (1,), generator=gen))
                    t = pool[start:start + count] if reps == 1 else pool.repeat(reps)[start:start + count]
                f.write(t.numpy().tobytes())
                del t
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    cfg.save_pretrained(folder)
    _processor(row).save_pretrained(folder)
    return total


def run_measured(cmd: list[str], timeout: float) -> dict:
    """rc, wall seconds, peak RSS bytes (wait4's rusage of the child) and the output's tail."""
    start = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    assert proc.stdout is not None
    for line in proc.stdout:
        out.append(line)
        print("   |", line.rstrip()[:200], flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "wall": time.perf_counter() - start, "rss": usage.ru_maxrss * 1024,
            "cpu": usage.ru_utime + usage.ru_stime,
            "tail": "".join(out)[-3000:]}


def measure(row: str, work: Path, keep: bool, timeout: float, reuse: bool = False) -> dict:
    src, out = work / row / "src", work / row / "out"
    t = time.perf_counter()
    if reuse and (src / "model.safetensors.index.json").is_file():  # a folder this script built and kept
        shutil.rmtree(out, ignore_errors=True)
        weights = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    else:
        shutil.rmtree(work / row, ignore_errors=True)
        print(f"[{row}] building the folder ...", flush=True)
        weights = build(row, src)
    built = time.perf_counter() - t
    print(f"[{row}] built {weights / 1e9:.1f} GB in {built:.0f} s", flush=True)
    neurons = work / row / "n.json"
    depth = ROWS[row]["vision"]["num_hidden_layers"]
    neurons.write_text(json.dumps({"register_neurons": NEURONS if depth > 12 else {"1": [1, 2, 3], "2": [7]}}))
    load = load_average()
    res = run_measured([sys.executable, "-m", "surgery.cli", "convert", str(src), "--neurons", str(neurons),
                        "--out", str(out)], timeout)
    res.update(row=row, weights=weights, build_s=built, load_before=load, load_after=load_average())
    if res["rc"] == 0:
        files = sorted(p.name for p in out.iterdir())
        res["out_files"] = [f for f in files if f.endswith((".safetensors", ".json"))]
        parity = json.loads((out / "parity.json").read_text())["parity"]
        res["parity"] = {"passed": parity["passed"], "worst": parity["worst"]["name"],
                         "outputs": sorted(o["name"] for o in parity["outputs"])[-3:]}
    if not keep:
        shutil.rmtree(work / row, ignore_errors=True)
    return res


def measure_find(row: str, work: Path, count: int, timeout: float) -> dict:
    """`find SRC --images DIR` (`count` organism images) on the row's folder, built if it is not kept."""
    from benchmarks.benchlib import write_images

    src = work / row / "src"
    if not (src / "model.safetensors.index.json").is_file():
        print(f"[{row}] building the folder ...", flush=True)
        build(row, src)
    images = work / row / f"images{count}"
    shutil.rmtree(images, ignore_errors=True)
    write_images(images, count)
    out = work / row / "found.json"
    out.unlink(missing_ok=True)
    load = load_average()
    res = run_measured([sys.executable, "-m", "surgery.cli", "find", str(src), "--images", str(images),
                        "--num-images", str(count), "--out", str(out)], timeout)
    res.update(row=f"{row} find ({count} images)", load_before=load, load_after=load_average(),
               weights=json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"])
    if res["rc"] == 0:
        res["neurons"] = json.loads(out.read_text()).get("register_neurons")
    return res


def table(results: list[dict]) -> str:
    lines = ["| row | weights | convert wall (check included) | CPU time | peak RSS | target met (<= 10 min, <= 4 GiB) "
             "| parity |", "|---|---|---|---|---|---|---|"]
    for r in results:
        ok = r["rc"] == 0 and r["wall"] <= 600 and r["rss"] <= 4 * GiB
        parity = ("PASS" if r.get("parity", {}).get("passed") else "FAIL") if r["rc"] == 0 else f"exit {r['rc']}"
        lines.append(f"| {r['row']} | {r['weights'] / 1e9:.1f} GB | {r['wall']:.0f} s | {r.get('cpu', 0):.0f} s | "
                     f"{r['rss'] / GiB:.2f} GiB | "
                     f"{'yes' if ok else 'no'} | {parity} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="llava15_7b")
    ap.add_argument("--work", default="/tmp/vitsurgery-bench-vlm")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="use a folder kept (--keep) by an earlier run")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--write", action="store_true", help="replace this benchmark's section of RESULTS.md")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--find", type=int, default=0, metavar="N",
                    help="instead of convert: `find` with N calibration images on each row's folder")
    a = ap.parse_args()
    results = []
    for row in a.rows.split(","):
        if a.find:
            r = measure_find(row, Path(a.work), a.find, a.timeout)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "tail"}, indent=1), flush=True)
            if r["rc"] != 0:
                print(r["tail"], flush=True)
            continue
        r = measure(row, Path(a.work), a.keep, a.timeout, a.reuse)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "tail"}, indent=1), flush=True)
        if r["rc"] != 0:
            print(r["tail"], flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))
    body = (f"`{command_line()}` ({today()}; {machine()}; load average before/after each row in the JSON; the "
            "machine was shared with other helpers' jobs).\n\n" + table(results) + "\n")
    print(body)
    if a.write:
        write_section("VLMs at the size people hold them (issue 29)", body)


if __name__ == "__main__":
    main()
