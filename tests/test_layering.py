"""Dependencies point downwards: kernels < ir < passes < compiler < runtime. A module may import
its own layer and those below; the leaf modules errors.py, options.py and fileio.py (which import nothing
of ggfuse but errors) may be imported by all; the CLI (compiler/cli.py) sits on top of
everything, as the user's entry point. Function-level imports count too."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ["kernels", "ir", "passes", "compiler", "runtime"]
LEAVES = {"errors", "options", "fileio"}
TOP = {os.path.join("compiler", "cli.py")}


def _imports(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name


def _layer_of(module: str):
    parts = module.split(".")
    if parts[0] != "ggfuse" or len(parts) < 2:
        return None
    return parts[1]


def test_imports_point_downwards():
    bad = []
    for i, layer in enumerate(LAYERS):
        for dirpath, _, files in os.walk(os.path.join(ROOT, layer)):
            for fn in files:
                if not fn.endswith(".py"):
                    continue
                path = os.path.join(dirpath, fn)
                rel = os.path.relpath(path, ROOT)
                if rel in TOP:
                    continue
                for line, mod in _imports(path):
                    dep = _layer_of(mod)
                    if dep is None or dep in LEAVES:
                        continue
                    if dep not in LAYERS or LAYERS.index(dep) > i:
                        bad.append(f"{rel}:{line} ({layer}) imports {mod}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_leaf_modules_import_nothing_above():
    for leaf in LEAVES:
        for line, mod in _imports(os.path.join(ROOT, f"{leaf}.py")):
            dep = _layer_of(mod)
            assert dep in (None, "errors"), f"{leaf}.py:{line} imports {mod}"
