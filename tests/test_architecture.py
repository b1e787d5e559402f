"""The layout's rules, checked on the code's own imports (module level and inside functions alike).

- no import cycle among the modules of surgery/ and exporters/;
- surgery.core knows no library backend: it imports only surgery.core, the standard library and
  torch / numpy / PIL / tqdm / safetensors;
- exporters/ (formats) import surgery.core and the `surgery` package root only, never the pipeline,
  the CLI, the API or a backend;
- a backend package imports no other backend package, except the edges listed in ALLOWED_BACKEND_EDGES;
- importing core modules leaves open_clip, transformers and timm unimported.
Each checker is also run on a small synthetic package that breaks its rule, so it can fail.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("surgery", "exporters")
CORE_THIRD_PARTY = {"torch", "numpy", "PIL", "tqdm", "safetensors"}
# backend -> backends it may import, and why
ALLOWED_BACKEND_EDGES = {
    ("open_clip", "timm"),  # open_clip TimmModel towers hold timm trunks: the timm adapters handle the trunk
    ("dinov2_hub", "timm"),  # DINOv2 torch-hub checkpoints are loaded into timm models (timm's adapters, writer)
}


def module_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages (a package is its __init__)."""
    mods = {}
    for pkg in packages:
        for p in sorted((root / pkg).rglob("*.py")):
            parts = list(p.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = p
    return mods


def imported_names(name: str, path: Path) -> set[str]:
    """Every absolute module name `name` imports, anywhere in the file (functions included); for
    `from X import y` both X and X.y (y may be a submodule); `importlib.import_module("X")` counts."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            out.add(node.args[0].value)  # importlib.import_module("pkg.mod"): an import by name is an import
    return out


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or \
        (isinstance(func, ast.Name) and func.id == "import_module")


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports (edges to itself dropped)."""
    mods = module_files(root, packages)
    return {m: {d for d in imported_names(m, p) if d in mods and d != m} for m, p in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def core_violations(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """'module -> import' for every import of a surgery.core module outside surgery.core and the allowed libraries."""
    bad = []
    for m, p in module_files(root, packages).items():
        if m != "surgery.core" and not m.startswith("surgery.core."):
            continue
        for d in sorted(imported_names(m, p)):
            top = d.split(".")[0]
            if top in PACKAGES:
                if d != "surgery.core" and not d.startswith("surgery.core."):
                    bad.append(f"{m} -> {d}")
            elif top not in CORE_THIRD_PARTY and top not in sys.stdlib_module_names and top != "__future__":
                bad.append(f"{m} -> {d}")
    return bad


def exporter_violations(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Imports of the surgery package by exporters/ that are not surgery.core or the package root."""
    bad = []
    for m, p in module_files(root, packages).items():
        if m.split(".")[0] != "exporters":
            continue
        for d in sorted(imported_names(m, p)):
            if d.split(".")[0] == "surgery" and d != "surgery" and not d.startswith("surgery.core") \
                    and not d.startswith("surgery.__version__"):
                bad.append(f"{m} -> {d}")
    return bad


def _backend_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[:2] == ["surgery", "backends"] and len(parts) > 2 and parts[2] != "base":
        return parts[2]
    return None


def backend_violations(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Imports from one backend package into another that ALLOWED_BACKEND_EDGES does not list."""
    bad = []
    for m, p in module_files(root, packages).items():
        mine = _backend_of(m)
        if mine is None:
            continue
        for d in sorted(imported_names(m, p)):
            theirs = _backend_of(d)
            if theirs is not None and theirs != mine and (mine, theirs) not in ALLOWED_BACKEND_EDGES:
                bad.append(f"{m} -> {d}")
    return bad


# ---- the repository --------------------------------------------------------------------------------

def test_no_import_cycle():
    found = cycles(import_graph(ROOT))
    assert found == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_core_imports_only_core_and_the_allowed_libraries():
    bad = core_violations(ROOT)
    assert bad == [], "surgery.core imports outside itself:\n" + "\n".join(bad)


def test_exporters_never_import_pipeline_cli_api_or_backends():
    bad = exporter_violations(ROOT)
    assert bad == [], "exporters/ imports above surgery.core:\n" + "\n".join(bad)


def test_backends_import_no_other_backend_beyond_the_listed_edges():
    bad = backend_violations(ROOT)
    assert bad == [], "backend packages importing each other:\n" + "\n".join(bad)


def test_every_backend_package_is_in_the_registry():
    """The registry line is the one place a backend is added: every package under surgery/backends is listed."""
    packages = sorted(p.name for p in (ROOT / "surgery" / "backends").iterdir() if (p / "__init__.py").is_file())
    src = (ROOT / "surgery" / "backends" / "__init__.py").read_text(encoding="utf-8")
    listed = [line for line in src.splitlines() if line.startswith("BACKENDS")]
    assert len(listed) == 1
    assert sorted(name for name in packages if f"{name}.BACKEND" in listed[0]) == packages


def test_importing_the_core_loads_no_library_backend():
    core = sorted(m for m in module_files(ROOT) if m.startswith("surgery.core."))
    assert "surgery.core.bake" in core and "surgery.core.parity" in core
    code = ("import sys\n" + "".join(f"import {m}\n" for m in core)
            + "print(sorted(k for k in ('open_clip', 'transformers', 'timm') if k in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


# ---- the checkers themselves can fail ------------------------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return root


def test_cycle_checker_finds_cycles_through_function_level_and_by_name_imports(tmp_path):
    root = _write(tmp_path, {
        "surgery/__init__.py": "",
        "surgery/core/__init__.py": "",
        "surgery/core/a.py": "from . import b\n",
        "surgery/core/b.py": "def f():\n    from .c import g\n",
        "surgery/core/c.py": "from surgery.core.a import x\n",
        "surgery/core/e.py": "def f():\n    import importlib\n    importlib.import_module('surgery.core.f')\n",
        "surgery/core/f.py": "import surgery.core.e\n",
        "surgery/core/d.py": "from .a import y\n",
        "exporters/__init__.py": "",
    })
    assert cycles(import_graph(root)) == [["surgery.core.a", "surgery.core.b", "surgery.core.c"],
                                          ["surgery.core.e", "surgery.core.f"]]
    assert cycles({"x": {"y"}, "y": set()}) == []


def test_layer_checkers_flag_what_they_forbid(tmp_path):
    root = _write(tmp_path, {
        "surgery/__init__.py": "",
        "surgery/core/__init__.py": "",
        "surgery/core/ok.py": "import json\nimport torch\nfrom .other import z\n",
        "surgery/core/bad.py": "def f():\n    from ..backends import adapter_for\n    import open_clip\n",
        "surgery/backends/__init__.py": "",
        "surgery/backends/base.py": "",
        "surgery/backends/hf/__init__.py": "from ..timm import BACKEND\nfrom ..base import Backend\n",
        "surgery/backends/open_clip/__init__.py": "from ..timm.adapter import TIMM\n",
        "surgery/backends/timm/__init__.py": "",
        "exporters/__init__.py": "",
        "exporters/fmt.py": "from surgery import __version__\nfrom surgery.core.ok import z\n"
                            "def f():\n    from surgery.pipeline import run\n",
    })
    assert core_violations(root) == ["surgery.core.bad -> open_clip", "surgery.core.bad -> surgery.backends",
                                     "surgery.core.bad -> surgery.backends.adapter_for"]
    assert exporter_violations(root) == ["exporters.fmt -> surgery.pipeline", "exporters.fmt -> surgery.pipeline.run"]
    assert backend_violations(root) == ["surgery.backends.hf -> surgery.backends.timm",
                                        "surgery.backends.hf -> surgery.backends.timm.BACKEND"]
