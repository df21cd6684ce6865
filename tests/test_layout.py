"""The package layout: imports run one way (docs/design.md, layout).

    models <- sampling <- rollout <- rl, with tools and rewards below rollout

Every `import tepo_jax.X` in the source is read with `ast` (function-level imports included,
since a cycle hidden in a function is still a cycle a reader must untangle), and the graph
between the parts of the package (its subpackages and top-level modules) must have no cycle.
"""
import ast
import pathlib

import pytest

import tepo_jax

PACKAGE = pathlib.Path(tepo_jax.__file__).parent

# (part, parts it must never import, directly or through others)
LAYERS = [
    ("models", {"sampling", "rollout", "rl", "tools", "rewards", "sft", "data", "experiment"}),
    ("sampling", {"rollout", "rl", "tools", "rewards", "sft", "experiment"}),
    ("tools", {"rollout", "rl", "rewards", "sampling", "models", "sft", "experiment"}),
    ("rewards", {"rollout", "rl", "sampling", "models", "sft", "experiment"}),
    ("rollout", {"rl", "sft", "experiment", "train"}),
    ("rl", {"sft", "experiment", "train"}),
]


def part_of(module: str) -> str:
    """'tepo_jax.rollout.agent' -> 'rollout'; 'tepo_jax.tokenizer' -> 'tokenizer'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: pathlib.Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out.update(n for n in names if n == "tepo_jax" or n.startswith("tepo_jax."))
    return out


def part_graph(root: pathlib.Path) -> dict[str, dict[str, set[str]]]:
    """{part: {imported part: {files that import it}}}, self-imports left out."""
    parts = {p.stem if p.is_file() else p.name for p in root.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    graph: dict[str, dict[str, set[str]]] = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        src = rel.parts[0].removesuffix(".py")
        for module in imported_modules(path):
            dst = part_of(module)
            if dst in parts and dst != src:
                graph.setdefault(src, {}).setdefault(dst, set()).add(str(rel))
    return graph


def reachable(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), {}):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def cycles(graph) -> list[tuple[str, str]]:
    """Pairs (a, b) with a importing b and b reaching back to a."""
    return sorted((a, b) for a in graph for b in graph[a] if a in reachable(graph, b))


def test_no_import_cycle_between_parts_of_the_package():
    graph = part_graph(PACKAGE)
    found = cycles(graph)
    detail = [f"{a} -> {b} ({', '.join(sorted(graph[a][b]))})" for a, b in found]
    assert not found, "import cycles between parts of tepo_jax:\n" + "\n".join(detail)


@pytest.mark.parametrize("part,forbidden", LAYERS, ids=[p for p, _ in LAYERS])
def test_lower_layers_do_not_import_higher_ones(part, forbidden):
    graph = part_graph(PACKAGE)
    bad = reachable(graph, part) & forbidden
    assert not bad, f"{part} reaches {sorted(bad)}: {graph.get(part)}"


def test_the_checker_finds_a_cycle(tmp_path):
    """The checks can fail: a two-part package whose parts import each other is a cycle."""
    pkg = tmp_path / "pkg"
    for name, other in (("a", "b"), ("b", "a")):
        (pkg / name).mkdir(parents=True)
        (pkg / name / "__init__.py").write_text("")
        # A function-level import counts too.
        (pkg / name / "m.py").write_text(f"def f():\n    from tepo_jax.{other}.m import f\n")
    graph = part_graph(pkg)
    assert cycles(graph) == [("a", "b"), ("b", "a")]
    assert reachable(graph, "a") == {"a", "b"}
