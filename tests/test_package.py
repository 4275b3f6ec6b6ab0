"""The package's shape (``deepseek_jax/``): the import graph, imports inside functions included, has no circle;
dependencies point one way between the folders; no folder is a heap; the code cites only documents the repository
holds; the public surface answers from ``deepseek_jax``."""

import ast
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
PACKAGE = os.path.join(ROOT, "deepseek_jax")

# The folders bottom to top (docs/architecture.md): a module may import its own folder and folders below it.
LAYERS = {
    "ops": 0, "config": 0,
    "lm_eval": 0,  # lm-eval's registry entry only: a name and where the model is (inference/harness.py)
    "parallel": 1, "data": 1,
    "quant": 2,
    "layers": 3,
    "moe": 4,
    "models": 5,
    "checkpoint": 6,
    "inference": 7, "training": 7,
    "posttrain": 8, "tools": 8,
    "cli": 9,
    "": 10,  # deepseek_jax/__init__.py re-exports the public surface
}


def _modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (module level, functions, methods)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        base = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(open(path).read())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                src = node.module or ""
                if node.level:
                    parts = base.split(".")
                    src = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                # `from pkg import sub` imports the submodule; `from mod import name` the module
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            edges |= {t for t in targets if t in mods and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_find_cycle_finds_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_import_graph_sees_function_level_imports():
    graph = import_graph()
    # cli/train.py imports its training code inside the command function only
    assert "deepseek_jax.training.run" in graph["deepseek_jax.cli.train"]


def test_no_import_circle():
    graph = import_graph()
    assert len(graph) > 60
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_dependencies_point_one_way():
    graph = import_graph()
    for name, edges in graph.items():
        if _folder(name) not in LAYERS:
            raise AssertionError(f"{name}: its folder is not in the layer table")
        for target in edges:
            a, b = _folder(name), _folder(target)
            if a != b:
                assert LAYERS[b] < LAYERS[a], f"{name} ({a}) imports {target} ({b}), which is not below it"


def test_no_folder_is_a_heap():
    for dirpath, dirs, files in os.walk(PACKAGE):
        modules = [f for f in files if f.endswith(".py") and f != "__init__.py"]
        assert len(modules) <= 12, f"{dirpath}: {len(modules)} modules side by side"
        if "__pycache__" not in dirpath:
            assert "__init__.py" in files, f"{dirpath}: not a package"


def test_code_cites_only_documents_in_the_repository():
    cited = re.compile(r"((?:[\w.-]+/)*[\w-]+\.md)\b")
    for dirpath, _, files in os.walk(ROOT):
        if any(skip in dirpath for skip in (".venv", ".git", "__pycache__", "node_modules")):
            continue
        for f in files:
            if not f.endswith((".py", ".ipynb", ".toml")):
                continue
            text = open(os.path.join(dirpath, f), encoding="utf-8").read()
            for doc in set(cited.findall(text)):
                here = os.path.exists(os.path.join(ROOT, doc)) or os.path.exists(os.path.join(dirpath, doc))
                assert here, f"{os.path.join(dirpath, f)} cites {doc}, which the repository does not hold"


@pytest.mark.parametrize("name", ["Transformer", "ModelConfig", "ModelOptions", "load_pretrained", "presets",
                                  "generate", "Block", "ConfigError", "RopeScaling", "attention_layout",
                                  "attention_mask"])
def test_public_surface(name):
    import deepseek_jax as dsj

    assert name in dsj.__all__ and getattr(dsj, name) is not None
