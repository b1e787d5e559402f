"""Other versions of the clients, installed on demand and cached: onnxruntime in a venv per version, and
transformers.js under node. Each helper skips the calling test with the reason when its client cannot be
had (no network, no node/npm). Cache: the user cache dir (`cache_dir()` in tests/helpers/timm_sdist.py).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.timm_sdist import cache_dir

# onnxruntime versions the ONNX exports are run in: the oldest pyproject allows (onnxruntime>=1.18), a few
# in between, 1.30 (the one transformers.js 4.x bundles, which fused float64 QuickGELU into a float-only
# kernel) and the newest at the time of writing.
ORT_VERSIONS = ("1.18.1", "1.20.1", "1.22.1", "1.24.4", "1.30.0", "1.32.0")
TRANSFORMERS_JS = "@huggingface/transformers@4"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def ort_python(version: str) -> Path:
    """The python of a cached venv with onnxruntime==version (numpy < 2 for onnxruntime < 1.19, which was
    built against numpy 1). Isolated from the system site-packages, so nothing installed here changes."""
    root = cache_dir() / "ort-venvs" / f"py{sys.version_info[0]}{sys.version_info[1]}-onnxruntime-{version}"
    py = root / "bin" / "python"
    ok = root / ".complete"
    if ok.is_file() and py.is_file():
        return py
    shutil.rmtree(root, ignore_errors=True)
    venv.EnvBuilder(with_pip=True).create(root)
    pins = [f"onnxruntime=={version}"]
    if tuple(int(p) for p in version.split(".")[:2]) < (1, 19):
        pins.append("numpy<2")
    done = _run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins], timeout=900)
    if done.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"onnxruntime {version} could not be installed in a venv ({tail[0]})")
    ok.write_text(version)
    return py


def run_levels(path: Path, x: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """The installed onnxruntime's outputs of `path` on `x` at every graph optimisation level (CPU):
    {level: {output name: value}}."""
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    res = {}
    for name, level in levels.items():
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        res[name] = dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x})))
    return res


# Runs in the venv: every graph at every optimisation level on the given inputs, outputs saved as .npz.
ORT_RUNNER = r"""
import json, sys
import numpy as np
import onnxruntime as ort
jobs = json.loads(sys.argv[1])
levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
for job in jobs:
    x = np.load(job["input"])
    out = {}
    for name, level in levels.items():
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.log_severity_level = 3
        sess = ort.InferenceSession(job["model"], so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        for n, v in zip(names, sess.run(names, {sess.get_inputs()[0].name: x})):
            out[f"{name}/{n}"] = v
    np.savez(job["output"], **out)
print(ort.__version__)
"""


def transformers_js_dir() -> Path:
    """A cached npm project with @huggingface/transformers 4.x (CPU binaries only: the install scripts
    would fetch CUDA ones otherwise)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node/npm not installed: transformers.js not tested")
    root = cache_dir() / "transformers-js"
    ok = root / ".complete"
    if ok.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    (root / "package.json").write_text(json.dumps({"name": "vit-surgery-tjs", "private": True, "type": "module"}))
    env = dict(os.environ, ONNXRUNTIME_NODE_INSTALL="skip", ONNXRUNTIME_NODE_INSTALL_CUDA="skip")
    done = _run([npm, "install", "--no-audit", "--no-fund", TRANSFORMERS_JS], cwd=root, env=env, timeout=900)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"npm install {TRANSFORMERS_JS} failed: {tail[0]}")
    ok.write_text("ok")
    return root


# Runs under node: loads MODEL_DIR (an HF folder with onnx/model.onnx) the way transformers.js users do
# (local models only, default session options: graph optimisation "all"; DTYPE picks the file, default
# fp32), feeds the float32 pixels in INPUT (raw little-endian, shape given) and writes every output as JSON.
TJS_RUNNER = r"""
import fs from 'node:fs';
import path from 'node:path';
import { env, AutoModel, Tensor } from '@huggingface/transformers';
const [modelDir, inputFile, shapeJson, outFile, dtype] = process.argv.slice(2);
env.allowRemoteModels = false;
env.localModelPath = path.dirname(modelDir) + '/';
const model = await AutoModel.from_pretrained(path.basename(modelDir), { dtype: dtype || 'fp32', device: 'cpu' });
const buf = fs.readFileSync(inputFile);
const data = new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4);
const out = await model({ pixel_values: new Tensor('float32', data, JSON.parse(shapeJson)) });
const res = {};
for (const [k, v] of Object.entries(out)) res[k] = { dims: v.dims, data: Array.from(v.data) };
fs.writeFileSync(outFile, JSON.stringify(res));
const pkg = JSON.parse(fs.readFileSync(path.join(process.cwd(), 'node_modules/@huggingface/transformers/package.json')));
console.log(pkg.version);
"""


# Runs under node in transformers_js_dir(): one ONNX file in the onnxruntime-node that transformers.js 4
# bundles, with its default session options (graph optimisation "all"), on the float32 pixels in INPUT (raw
# little-endian, shape given); every output written as JSON. Prints onnxruntime-node's version.
ORT_NODE_RUNNER = r"""
import fs from 'node:fs';
import path from 'node:path';
import ort from 'onnxruntime-node';
const [model, inputFile, shapeJson, outFile] = process.argv.slice(2);
const buf = fs.readFileSync(inputFile);
const data = new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4);
const sess = await ort.InferenceSession.create(model);
const out = await sess.run({ [sess.inputNames[0]]: new ort.Tensor('float32', data, JSON.parse(shapeJson)) });
const res = {};
for (const [k, v] of Object.entries(out)) res[k] = { dims: v.dims, data: Array.from(v.data) };
fs.writeFileSync(outFile, JSON.stringify(res));
const pkg = JSON.parse(fs.readFileSync(path.join(process.cwd(), 'node_modules/onnxruntime-node/package.json')));
console.log(pkg.version);
"""
