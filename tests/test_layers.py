"""The package's layers: every import inside quillgpt/ points down (or sideways within a
subpackage), never up, and never in a circle. Lazy imports inside functions count too.

The layers, from the bottom (docs/architecture.md explains each):
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "quillgpt"

# module (or subpackage) -> its layer; a module may import only from lower layers
LAYERS: dict[str, int] = {
    # 0-2: plain Python, no torch: the error type; atomic writes (which raise it); downloads and
    # the file cache
    "errors": 0, "fileio": 1, "download": 2,
    # 2: RL's rewards (plain Python: a reply and its task in, a number out)
    "rewards": 2,
    # 2: settings and the device; the terminal (prompt loop, streaming printer: standard library only);
    # the built-in tools (calculator, python sandbox)
    "config": 2, "runtime": 2, "terminal": 2, "tools": 2,
    # 3: tokenizers (standard library, regex, optional tiktoken)
    "tokenizers": 3,
    # 4: the models, each standing on config alone
    "model": 4, "ladder": 4,
    # 5: which model a config names; optimisers; a model's precision for inference; per-token
    # losses; the settings of a decoded row and how a token is drawn. 6: the decode engine
    "registry": 5, "optim": 5, "inference": 5, "losses": 5, "sampling": 5, "engine": 6,
    # 6-9: corpora -> text pieces -> token files (and their cache) -> batches
    "readers": 6, "prepared": 7, "prepare": 8, "data": 9,
    # 10: run directories on disk
    "checkpoint": 10,
    # 11-12: using a model: generation, scoring, plots, processes; evaluation
    "generate": 11, "scoring": 11, "plot": 11, "distributed": 11, "evaluate": 12, "chat": 12,
    # 13: what a training run is made of; benchmark tasks through lm-evaluation-harness; exports
    "metrics": 13, "resume": 13, "train_control": 13, "hf": 13, "conversations": 13, "lm_eval_adapter": 13,
    "train_setup": 13, "train_eval": 13, "gguf_export": 13,
    # 14: the training loop
    "train": 14,
    # 15: what stands on the loop or on a loaded run
    "ladder_run": 15, "serve": 15, "sft": 15, "rl": 15,
    # 16-17: the command line and the package's front doors
    "cli": 16, "__main__": 17, "__init__": 17,
}

# narrower rules, on top of the order
MAY_IMPORT_ONLY = {
    "model": {"config", "errors"},
    "ladder": {"config", "errors"},
    "tokenizers": {"errors", "fileio", "download"},
}


def unit_of(path: Path) -> str:
    """The layer unit of a source file: its module name, or its subpackage's name."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_units(path: Path, root: Path = PACKAGE) -> set[str]:
    """The quillgpt units a file imports (absolute or relative, at the top or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel = path.relative_to(root)
    depth = len(rel.parts) - 1  # 0 for quillgpt/x.py, 1 for quillgpt/sub/x.py
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = [node.module or ""]
            else:
                up = node.level - 1  # `from .` stays in this file's package
                base = list(rel.parts[:-1])
                base = base[: len(base) - up] if up else base
                if up > depth:
                    continue
                module = ".".join(["quillgpt", *base, *(node.module.split(".") if node.module else [])])
                names = [module]
                if not node.module:  # `from . import checkpoint`: the names that are modules
                    here = root.joinpath(*base)
                    names = [f"{module}.{a.name}" for a in node.names
                             if (here / f"{a.name}.py").is_file() or (here / a.name).is_dir()]
        for name in names:
            parts = name.split(".")
            if parts[0] == "quillgpt" and len(parts) > 1:
                found.add(parts[1])
    return found


def source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in source_files():
        unit = unit_of(path)
        graph.setdefault(unit, set()).update(u for u in imported_units(path) if u != unit)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_module_has_a_layer():
    missing = sorted({unit_of(p) for p in source_files()} - set(LAYERS))
    assert not missing, f"give these modules a layer in LAYERS (and docs/architecture.md): {missing}"


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    unit = unit_of(path)
    for other in sorted(imported_units(path) - {unit}):
        assert other in LAYERS, f"{path.name} imports an unknown module quillgpt.{other}"
        if unit == "__init__":
            continue  # the package's front door re-exports from anywhere, lazily
        assert LAYERS[other] < LAYERS[unit], (
            f"quillgpt/{path.relative_to(PACKAGE)} (layer {LAYERS[unit]}) imports quillgpt.{other} "
            f"(layer {LAYERS[other]}): imports must point down")
        if unit in MAY_IMPORT_ONLY:
            assert other in MAY_IMPORT_ONLY[unit], f"{unit} may import only {sorted(MAY_IMPORT_ONLY[unit])}"


def test_nothing_imports_the_cli():
    for path in source_files():
        if unit_of(path) not in ("cli", "__main__"):
            assert "cli" not in imported_units(path), f"{path} imports quillgpt.cli"


def test_no_import_cycles():
    graph = import_graph()
    graph.pop("__init__", None)  # lazy re-exports only
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def subpackage_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same subpackage it imports (at the top or inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found = graph.setdefault(path.stem, set())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:  # `from . import x`
                    found.update(a.name for a in node.names if (package / f"{a.name}.py").is_file())
        found.discard(path.stem)
    return graph


@pytest.mark.parametrize("package", sorted(p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()),
                         ids=lambda p: p.name)
def test_no_import_cycles_inside_a_subpackage(package):
    """Inside a subpackage, modules import one another in one direction only (tokenizers/bpe.py
    never imports hf_files, which stands on it)."""
    graph = subpackage_graph(package)
    graph.pop("__init__", None)  # the subpackage's front door gathers its modules
    assert find_cycle(graph) is None, f"import cycle in {package.name}/: {' -> '.join(find_cycle(graph) or [])}"


def test_the_check_finds_a_cycle_inside_a_subpackage(tmp_path):
    pkg = tmp_path / "tokenizers"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from .b import g\n", encoding="utf-8")
    (pkg / "b.py").write_text("from .a import f\n", encoding="utf-8")
    assert find_cycle(subpackage_graph(pkg)) == ["a", "b", "a"]


def test_the_check_finds_a_cycle_and_an_upward_import(tmp_path):
    """The checks above would fail if someone added a cycle: shown on a small graph, and on a
    real file that imports upwards."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    path = PACKAGE / "tokenizers" / "char.py"
    src = path.read_text(encoding="utf-8")
    fake = tmp_path / "quillgpt" / "tokenizers" / "char.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(src + "\n\ndef _f():\n    from ..data import BatchSampler\n", encoding="utf-8")
    assert "data" in imported_units(fake, root=tmp_path / "quillgpt")
    assert "data" not in imported_units(path)
