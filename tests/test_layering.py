"""The house's layering, read from the source (no imports run): each package imports only the
layers below it, no package-level cycle, and no project import hidden inside a function (the CLI
alone imports its runners lazily, to start fast)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: What each part may import from the project (itself always allowed).
ALLOWED: dict[str, set[str]] = {
    "reliableswap": set(),  # the package root: its version only
    "triplets": set(),
    "reliableswap.errors": {"triplets"},  # the two expected failures (triplets.errors): every layer may raise them
    "reliableswap.contracts": {"triplets"},  # the commands' own records, on triplets' record base
    "reliableswap.choices": set(),
    "reliableswap.device": set(),
    "reliableswap.geometry": set(),
    "reliableswap.images": {"triplets", "reliableswap.contracts"},
    "reliableswap.recipes": {"reliableswap.choices", "triplets"},
    "reliableswap.checkpoints": {"triplets"},
    "reliableswap.faces": {"reliableswap.geometry", "reliableswap.images", "reliableswap.choices", "reliableswap.checkpoints", "triplets", "reliableswap.contracts"},
    "reliableswap.flame": {"reliableswap.geometry", "triplets", "reliableswap.contracts"},
    "reliableswap.nets": {"reliableswap.faces", "reliableswap.checkpoints", "triplets"},  # MissingWeightsError; bounded reads
    "reliableswap.judge": {"reliableswap.nets", "reliableswap.faces", "reliableswap.geometry", "reliableswap.images"},
    "reliableswap.synth": {"reliableswap.judge", "reliableswap.geometry", "reliableswap.faces", "reliableswap.flame", "reliableswap.nets",
                           "reliableswap.images", "reliableswap.recipes", "reliableswap.choices"},
    "reliableswap.pairs": {"reliableswap.judge", "reliableswap.faces", "reliableswap.recipes", "reliableswap.choices", "triplets", "reliableswap.contracts"},
    "reliableswap.viz": {"reliableswap.images", "triplets", "reliableswap.contracts"},
    "reliableswap.evaluation": {"reliableswap.faces", "reliableswap.geometry", "reliableswap.images"},
    "reliableswap.train": {"reliableswap.judge", "reliableswap.images", "reliableswap.faces", "reliableswap.checkpoints", "reliableswap.recipes", "reliableswap.choices",
                           "reliableswap.device", "triplets", "reliableswap.contracts"},
    "reliableswap.jobs": {"reliableswap", "triplets", "reliableswap.contracts"},  # `reliableswap` itself: __version__
    "reliableswap.engine": {"reliableswap.jobs"},
    "reliableswap.testing": {"reliableswap.faces", "reliableswap.images", "reliableswap.nets", "triplets", "reliableswap.contracts"},
    "reliableswap.commands": {"*"},  # above everything but the CLI
    "reliableswap.cli": {"*"},
}
#: Lazy on purpose (not to dodge a cycle): ``import triplets`` stays free of torch until the
#: dataset is asked for.
LAZY_OK = {("triplets", "triplets.dataset")}
HEAVY_IN_GEOMETRY = {"dlib", "cv2", "numpy", "PIL", "reliableswap.faces", "reliableswap.flame"}


def _part(module: str) -> str:
    best = ""
    for p in ALLOWED:
        if (module == p or module.startswith(p + ".")) and len(p) > len(best):
            best = p
    assert best, f"{module} belongs to no layer: add it to ALLOWED"
    return best


def _modules():
    for path in sorted([*(ROOT / "reliableswap").rglob("*.py"), *(ROOT / "triplets").rglob("*.py")]):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), ast.parse(path.read_text(), str(path))


def _imports(tree: ast.AST):
    """(module imported, at top level?) for every import statement."""
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, id(node) in top, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module, id(node) in top, node.lineno


def test_layers_import_only_what_lies_below():
    bad = []
    for module, tree in _modules():
        part = _part(module)
        for imp, _, line in _imports(tree):
            if imp.split(".")[0] not in ("reliableswap", "triplets"):
                continue
            target = _part(imp)
            if target == "reliableswap.errors":
                continue
            allowed = ALLOWED[part]
            if target != part and "*" not in allowed and target not in allowed:
                bad.append(f"{module}:{line} ({part}) imports {imp} ({target})")
            if part == "triplets" and imp.startswith("reliableswap"):
                bad.append(f"{module}:{line}: triplets must never import reliableswap")
    assert not bad, "\n".join(bad)


def test_no_project_import_hidden_in_a_function():
    """Function-local imports of project modules dodge cycles; only the CLI imports lazily."""
    bad = [f"{module}:{line} imports {imp} inside a function"
           for module, tree in _modules() if module != "reliableswap.cli"
           for imp, top, line in _imports(tree)
           if not top and imp.split(".")[0] in ("reliableswap", "triplets") and (module, imp) not in LAZY_OK]
    assert not bad, "\n".join(bad)


def test_geometry_needs_only_torch():
    bad = [f"{module}:{line} imports {imp}" for module, tree in _modules() if module.startswith("reliableswap.geometry")
           for imp, _, line in _imports(tree) if imp.split(".")[0] in HEAVY_IN_GEOMETRY or imp in HEAVY_IN_GEOMETRY]
    assert not bad, "\n".join(bad)


def test_nothing_in_the_library_imports_the_test_fixtures():
    bad = [f"{module}:{line}" for module, tree in _modules() if not module.startswith("reliableswap.testing")
           for imp, _, line in _imports(tree) if imp.startswith("reliableswap.testing")]
    assert not bad, "\n".join(bad)
