"""The layout's rules, checked on the code's own imports (module level and inside functions alike).

- no import cycle among the modules of surgery/ and exporters/;
- surgery.core knows no library backend: it imports only surgery.core, the standard library and
  torch / numpy / PIL / tqdm / safetensors, and onnxruntime inside functions (core/onnx_runtime.py, the
  one session helper of the exporters and the ONNX rewrite);
- exporters/ (formats) import surgery.core and the `surgery` package root only, never the pipeline,
  the CLI, the API or a backend;
- a backend package imports no other backend package, except the edges listed in ALLOWED_BACKEND_EDGES;
- the on-disk format (surgery/core/output_format.py) imports the standard library and surgery.core.errors
  only: backends, exporters and the ONNX graph rewrite all read and write through it;
- the ONNX graph rewrite (surgery/onnx_graph/, its CLI glue aside) imports surgery.core, the package root
  and itself, never the pipeline, the published sets, the organisms or a backend (ALLOWED_ONNX_GRAPH_EDGES
  lists the exceptions, with their reason);
- the model organisms (test and demo fixtures) are imported by no library module (the demo aside);
- importing core modules leaves open_clip, transformers, timm and onnxruntime unimported;
- no module imports another module's underscore names (`from m import _x`, `m._x`; rule at
  `underscore_imports`).
Each checker is also run on a small synthetic package that breaks its rule, so it can fail.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("surgery", "surgery.exporters")
PACKAGE_DIRS = {"surgery.exporters": "exporters"}  # dotted package -> its folder in the repository
EXPORTERS = PACKAGES[-1]  # the formats package
FORMAT_MODULE = "surgery.core.output_format"
ALLOWED_ONNX_GRAPH_EDGES = {
    # preprocessor_config.json next to an ONNX file is HF's format: read with the HF loader's own parser
    ("surgery.onnx_graph.discover", "surgery.backends.hf.loader"),
}
CORE_THIRD_PARTY = {"torch", "numpy", "PIL", "tqdm", "safetensors",
                    "onnxruntime"}  # a runtime, not a model library: imported lazily (test below)
# backend -> backends it may import, and why
ALLOWED_BACKEND_EDGES = {
    ("open_clip", "timm"),  # open_clip TimmModel towers hold timm trunks: the timm adapters handle the trunk
    ("dinov2_hub", "timm"),  # DINOv2 torch-hub checkpoints are loaded into timm models (timm's adapters, writer)
}


def module_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages (a package is its __init__). A
    package's folder is PACKAGE_DIRS[package], else the package name with dots as slashes."""
    mods = {}
    for pkg in packages:
        folder = root / PACKAGE_DIRS.get(pkg, pkg.replace(".", "/"))
        for p in sorted(folder.rglob("*.py")):
            parts = pkg.split(".") + list(p.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = p
    return mods


def imported_names(name: str, path: Path, modules: frozenset[str] = frozenset()) -> set[str]:
    """Every absolute module name `name` imports, anywhere in the file (functions included); for
    `from X import y` both X and X.y (y may be a submodule), X.y alone when every y is one of `modules`
    (`from . import sibling` in a package reaches the sibling, not back into the package's __init__);
    `importlib.import_module("X")` counts."""
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
            subs = {f"{mod}.{a.name}" for a in node.names}
            if not subs <= modules:
                out.add(mod)
            out.update(subs)
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
    names = frozenset(mods)
    return {m: {d for d in imported_names(m, p, names) if d in mods and d != m} for m, p in mods.items()}


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
            if top in {p.split(".")[0] for p in PACKAGES}:
                if d != "surgery.core" and not d.startswith("surgery.core."):
                    bad.append(f"{m} -> {d}")
            elif top not in CORE_THIRD_PARTY and top not in sys.stdlib_module_names and top != "__future__":
                bad.append(f"{m} -> {d}")
    return bad


def exporter_violations(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Imports of the surgery package by exporters/ that are not surgery.core or the package root."""
    bad = []
    for m, p in module_files(root, packages).items():
        if not _within(m, EXPORTERS):
            continue
        for d in sorted(imported_names(m, p)):
            if d.split(".")[0] == "surgery" and d != "surgery" and not d.startswith("surgery.core") \
                    and not d.startswith("surgery.__version__") and not _within(d, EXPORTERS):
                bad.append(f"{m} -> {d}")
    return bad


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _project(d: str) -> bool:
    return any(_within(d, p.split(".")[0]) for p in PACKAGES)


def format_module_violations(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Imports of the on-disk format module other than the standard library and surgery.core.errors."""
    mods = module_files(root, packages)
    if FORMAT_MODULE not in mods:
        return [f"{FORMAT_MODULE} is missing"]
    return [f"{FORMAT_MODULE} -> {d}" for d in sorted(imported_names(FORMAT_MODULE, mods[FORMAT_MODULE]))
            if d.split(".")[0] not in sys.stdlib_module_names and d != "__future__"
            and not _within(d, "surgery.core.errors")]


def is_organism(module: str) -> bool:
    """A model organism module: surgery.organisms.*, or a module named organism* (older layout)."""
    return _within(module, "surgery.organisms") or module.rsplit(".", 1)[-1].startswith("organism")


def onnx_graph_violations(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Imports by the ONNX graph rewrite of project modules outside surgery.core, the package root and
    surgery.onnx_graph (its `cli` glue and organisms aside), unless ALLOWED_ONNX_GRAPH_EDGES lists them."""
    bad = []
    for m, p in module_files(root, packages).items():
        if not _within(m, "surgery.onnx_graph") or m.endswith(".cli") or is_organism(m):
            continue
        for d in sorted(imported_names(m, p)):
            if not _project(d) or d in ("surgery", "surgery.__version__") or _within(d, "surgery.core") \
                    or _within(d, "surgery.onnx_graph") and not is_organism(d):
                continue
            if not any(m == a and _within(d, b) for a, b in ALLOWED_ONNX_GRAPH_EDGES):
                bad.append(f"{m} -> {d}")
    return bad


def organism_violations(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Library modules importing a model organism (the organisms themselves and the demo aside)."""
    bad = []
    for m, p in module_files(root, packages).items():
        if is_organism(m) or m == "surgery.demo":
            continue
        bad += [f"{m} -> {d}" for d in sorted(imported_names(m, p)) if _project(d) and is_organism(d)]
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


def underscore_imports(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """'module:line name' for every underscore name one project module takes from another.

    The rule: a name starting with one underscore is private to the module that defines it, with no
    exception for siblings in one package: what another module needs is public (and named for what it
    is). Flagged: `from m import _x` and `m._x` where `m` is a project module (imported as a module, by
    `import m [as n]` or `from package import m`). Dunders are not private; third-party private APIs
    (timm.models._hub) are the libraries' business, not this rule's."""
    mods = module_files(root, packages)
    names = frozenset(mods)
    bad = []
    for m, p in mods.items():
        tree = ast.parse(p.read_text(encoding="utf-8"))
        is_pkg = p.name == "__init__.py"
        module_aliases: dict[str, str] = {}  # local name -> project module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in names:
                        module_aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = m.split(".") if is_pkg else m.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for a in node.names:
                    if f"{mod}.{a.name}" in names:
                        module_aliases[a.asname or a.name] = f"{mod}.{a.name}"
                    elif mod in names and mod != m and _private(a.name):
                        bad.append(f"{m}:{node.lineno} from {mod} import {a.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                target = node.value
                dotted = []
                while isinstance(target, ast.Attribute):
                    dotted.append(target.attr)
                    target = target.value
                if isinstance(target, ast.Name) and target.id in module_aliases:
                    owner = ".".join([module_aliases[target.id]] + dotted[::-1])
                    if owner in names and owner != m:
                        bad.append(f"{m}:{node.lineno} {owner}.{node.attr}")
    return bad


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


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


def test_the_format_module_imports_only_the_standard_library_and_errors():
    bad = format_module_violations(ROOT)
    assert bad == [], "the on-disk format module imports:\n" + "\n".join(bad)


def test_the_onnx_graph_rewrite_imports_only_the_core():
    bad = onnx_graph_violations(ROOT)
    assert bad == [], "surgery.onnx_graph imports above surgery.core:\n" + "\n".join(bad)


def test_no_library_module_imports_an_organism():
    bad = organism_violations(ROOT)
    assert bad == [], "library modules importing model organisms:\n" + "\n".join(bad)


def test_backends_import_no_other_backend_beyond_the_listed_edges():
    bad = backend_violations(ROOT)
    assert bad == [], "backend packages importing each other:\n" + "\n".join(bad)


def test_no_module_imports_another_modules_underscore_names():
    bad = underscore_imports(ROOT)
    assert bad == [], "underscore names taken across modules (make them public):\n" + "\n".join(bad)


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
            + "print(sorted(k for k in ('open_clip', 'transformers', 'timm', 'onnxruntime') if k in sys.modules))")
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
    pkg = _write(tmp_path / "pkg", {"surgery/__init__.py": "", "surgery/cli/__init__.py": "from .main import main\n",
                                    "surgery/cli/main.py": "from . import export\n", "surgery/cli/export.py": "",
                                    "exporters/__init__.py": ""})
    assert cycles(import_graph(pkg)) == []


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
        "surgery/core/output_format.py": "import json\nfrom .errors import E\nfrom .ok import z\n",
        "surgery/core/errors.py": "",
        "surgery/organisms/__init__.py": "",
        "surgery/organisms/vit.py": "from surgery.core.ok import z\n",
        "surgery/onnx_graph/__init__.py": "",
        "surgery/onnx_graph/bake.py": "from ..core.ok import z\nfrom .. import __version__\nfrom ..pipeline import run\n"
                                      "from ..organisms.vit import build\n",
        "surgery/onnx_graph/cli.py": "from ..pipeline import run\n",
        "surgery/pipeline.py": "def f():\n    from .organisms import vit\n",
    })
    assert format_module_violations(root) == ["surgery.core.output_format -> surgery.core.ok",
                                              "surgery.core.output_format -> surgery.core.ok.z"]
    assert onnx_graph_violations(root) == ["surgery.onnx_graph.bake -> surgery.organisms.vit",
                                           "surgery.onnx_graph.bake -> surgery.organisms.vit.build",
                                           "surgery.onnx_graph.bake -> surgery.pipeline",
                                           "surgery.onnx_graph.bake -> surgery.pipeline.run"]
    assert organism_violations(root) == ["surgery.onnx_graph.bake -> surgery.organisms.vit",
                                         "surgery.onnx_graph.bake -> surgery.organisms.vit.build",
                                         "surgery.pipeline -> surgery.organisms", "surgery.pipeline -> surgery.organisms.vit"]
    assert core_violations(root) == ["surgery.core.bad -> open_clip", "surgery.core.bad -> surgery.backends",
                                     "surgery.core.bad -> surgery.backends.adapter_for"]
    assert exporter_violations(root) == ["surgery.exporters.fmt -> surgery.pipeline", "surgery.exporters.fmt -> surgery.pipeline.run"]
    assert backend_violations(root) == ["surgery.backends.hf -> surgery.backends.timm",
                                        "surgery.backends.hf -> surgery.backends.timm.BACKEND"]


def test_underscore_checker_flags_private_names_taken_across_modules(tmp_path):
    root = _write(tmp_path, {
        "surgery/__init__.py": "",
        "surgery/core/__init__.py": "",
        "surgery/core/a.py": "_x = 1\ndef _f():\n    return _x\n",
        "surgery/core/b.py": "from .a import _f, __doc__\nfrom . import a\nimport surgery.core.a as aa\n"
                             "y = a._x + aa._x + a.__name__\n",
        "surgery/core/c.py": "import timm.models._hub\nfrom timm.models._hub import _p\nclass K:\n    _z = 1\n"
                             "    def g(self):\n        return self._z\n",
        "exporters/__init__.py": "",
    })
    assert underscore_imports(root) == ["surgery.core.b:1 from surgery.core.a import _f", "surgery.core.b:4 surgery.core.a._x",
                                        "surgery.core.b:4 surgery.core.a._x"]
