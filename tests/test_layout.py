"""The package's layout (issue 20, README "Where things are"): imports only go downward, with no circles.

Every module's imports are read with ``ast`` (those inside functions and ``TYPE_CHECKING`` blocks too), so a
lazy import cannot hide a circle.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sur_lightning"

# What users type (`python -m sur_lightning.X`): short Hydra mains that compose library calls.
ENTRY_POINTS = {
    f"sur_lightning.{name}"
    for name in (
        "train",
        "generate",
        "evaluate",
        "explore",
        "cache",
        "rewrite",
        "bench",
        "sweep_report",
        "embedding_map",
        "toyworld.pretrain",
        "toyworld.image_tower",
        "toyworld.probe",
    )
}
# The bottom of the house: frozen parts and connectors, data, knowledge. They import none of the rooms above.
BOTTOM = {"models", "data", "knowledge"}
ABOVE = {"training", "generation", "evaluation"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(name: str) -> set[str]:
    """The sur_lightning modules that module ``name`` imports (``from pkg import submodule`` counts the submodule)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in MODULES}
    return {m for m in found if m in MODULES and m != name}


def room(name: str) -> str:
    """The node a module belongs to in the package graph: its subpackage, or itself for a top-level module
    (``config``) and for an entry point."""
    if name in ENTRY_POINTS:
        return name
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else name


def room_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        if name == "sur_lightning":  # the package's __init__ (registers the config resolvers)
            continue
        for imported in imports(name):
            if imported != "sur_lightning" and room(imported) != room(name):
                graph.setdefault(room(name), set()).add(room(imported))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [node])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_every_entry_point_exists():
    assert ENTRY_POINTS <= set(MODULES)


def test_no_module_imports_an_entry_point():
    offenders = {name: sorted(imports(name) & ENTRY_POINTS) for name in MODULES}
    assert not {k: v for k, v in offenders.items() if v}, "library code or another entry point imports an entry point"


def test_packages_import_each_other_in_no_circle():
    assert find_cycle(room_graph()) is None


def module_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan): every import circle between files."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_files_import_each_other_in_no_circle():
    """File by file, the package root and type-checking imports included: a circle between two modules of one room
    (generation/columns.py and pipeline.py once) or through the root (connectors reading ``__version__`` from the
    root, which imports config, which imports connectors) is a knot even where the rooms' graph has none."""
    assert module_cycles({name: imports(name) for name in MODULES}) == []


def test_the_file_check_sees_the_two_knots_it_was_written_for():
    root_knot = {
        "sur_lightning": {"sur_lightning.config"},
        "sur_lightning.config": {"sur_lightning.models.connectors"},
        "sur_lightning.models.connectors": {"sur_lightning"},
    }
    room_knot = {
        "sur_lightning.generation.columns": {"sur_lightning.generation.pipeline"},
        "sur_lightning.generation.pipeline": {"sur_lightning.generation.columns"},
    }
    assert sorted(module_cycles({**root_knot, **room_knot})) == sorted([sorted(room_knot), sorted(root_knot)])
    assert module_cycles({"a": {"b"}, "b": {"c"}}) == []


def test_the_bottom_rooms_import_nothing_above_them():
    graph = room_graph()
    upward = {node: sorted(graph.get(node, set()) & ABOVE) for node in BOTTOM}
    assert not {k: v for k, v in upward.items() if v}


def test_the_checks_see_a_circle_and_an_entry_point_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None
    # ast finds lazy imports: the entry point train.py imports the feature cache inside no function, generate.py's
    # main composes generation/, and a function-level import counts like a top-level one.
    assert "sur_lightning.training.feature_cache" in imports("sur_lightning.train")
    assert "sur_lightning.generation.columns" in imports("sur_lightning.generate")


def test_every_conf_target_names_the_module_that_defines_it():
    """A ``_target_`` in conf/ points at the module where its object is defined, not at a module that imports it."""
    import importlib
    import re

    conf = PACKAGE.parent / "conf"
    wrong = []
    for path in sorted(conf.rglob("*.yaml")):
        for target in re.findall(r"_target_:\s*(sur_lightning\.[\w.]+)", path.read_text(encoding="utf-8")):
            module, _, name = target.rpartition(".")
            obj = getattr(importlib.import_module(module), name)
            if getattr(obj, "__module__", module) != module:
                wrong.append(f"{path.relative_to(conf)}: {target} is defined in {obj.__module__}")
    assert not wrong


TRAIN_GROUPS = ("backbone", "llm", "connector", "model", "eta", "loss", "rewriter", "data", "trainer", "callbacks")


def keys_the_target_does_not_take(node, where: str) -> list[str]:
    """Every ``_target_`` node under ``node`` whose keys its callable has no parameter for (Hydra merges keep a
    parent file's keys, so a child that swaps ``_target_`` can inherit ones its new target rejects)."""
    import inspect

    from hydra.utils import get_object
    from omegaconf import DictConfig, ListConfig

    wrong = []
    if isinstance(node, DictConfig):
        target = node.get("_target_")
        if isinstance(target, str):
            parameters = inspect.signature(get_object(target)).parameters.values()
            if not any(p.kind is p.VAR_KEYWORD for p in parameters):
                names = {p.name for p in parameters}
                extra = sorted(k for k in node if not str(k).startswith("_") and k not in names)
                wrong += [f"{where}: {target} takes no {extra}"] if extra else []
        for key in node:
            wrong += keys_the_target_does_not_take(node._get_node(key), f"{where}.{key}")
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            wrong += keys_the_target_does_not_take(node._get_node(i), f"{where}[{i}]")
    return wrong


@pytest.mark.parametrize("group", TRAIN_GROUPS)
def test_every_option_of_a_train_group_gives_its_targets_only_keys_they_take(compose, group):
    conf = PACKAGE.parent / "conf"
    wrong = []
    for option in sorted(p.stem for p in (conf / group).glob("*.yaml")):
        cfg = compose(f"{group}={option}", tiny=False)
        wrong += keys_the_target_does_not_take(cfg[group], f"{group}={option}")
    assert not wrong


def test_every_experiment_preset_gives_its_targets_only_keys_they_take(compose):
    conf = PACKAGE.parent / "conf"
    wrong = []
    for experiment in sorted(p.stem for p in (conf / "experiment").glob("*.yaml")):
        cfg = compose(f"+experiment={experiment}", tiny=False)
        wrong += keys_the_target_does_not_take(cfg, f"+experiment={experiment}")
    assert not wrong
