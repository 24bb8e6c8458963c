"""The package's layers: every import arrow points down, none closes a cycle, a stage is reached
from outside stages/ only through the registry, a name is imported from the module that defines
it, and an import inside a function is there only for a heavy or optional library or the CLI's
speed. An `ast` walk of rlhf_cli/, module-level and in-function imports alike."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "rlhf_cli"

# Lowest first. A module may import only modules before it in this order: those of lower layers
# and, inside its own layer, those listed before it.
LAYERS: list[tuple[str, list[str]]] = [
    ("L0 core", ["", "assets", "core", "core.quiet", "core.files", "core.progress", "core.errors"]),
    ("L0 core", ["core.distributed"]),
    ("L1 config, losses, rewards", ["config", "compose", "losses", "rewards", "multiturn"]),
    ("L1 config, losses, rewards", ["sentiment", "envs", "envs.reasoning_gym"]),
    ("L2 data", ["data", "data.rows", "data.examples", "data.batches"]),
    ("L3 model", ["model", "model.tiny", "model.real", "model.kernels", "model.load"]),
    ("L3 model", ["model.forward", "model.heads"]),
    (
        "L4 rollout",
        ["rollout", "rollout.batch", "rollout.vllm", "rollout.engine", "rollout.sampler"],
    ),
    ("L5 trainer", ["trainer", "trainer.diagnostics", "trainer.checkpoint", "trainer.card"]),
    ("L5 trainer", ["trainer.tracking", "trainer.state", "trainer.loop", "trainer.online"]),
    ("L6 stages", ["stages", "stages.sft", "stages.rm", "stages.dpo", "stages.kto", "stages.rs"]),
    ("L6 stages", ["stages.ppo", "stages.grpo", "stages.rloo", "stages.reinforce"]),
    ("L7 tools", ["tools", "tools.policy", "tools.sample", "tools.evaluate", "tools.score"]),
    ("L7 tools", ["tools.merge", "tools.plot", "tools.inspect", "tools.plan"]),
    ("L7 tools", ["tools.plan_measure", "train"]),
    ("L8 command line", ["commands", "cli", "__main__"]),
]
ORDER = {f"rlhf_cli.{m}".rstrip("."): i for i, m in enumerate(m for _, ms in LAYERS for m in ms)}
LAYER = {f"rlhf_cli.{m}".rstrip("."): name for name, ms in LAYERS for m in ms}

# In-function imports of our own modules, each with its reason; anything else goes at the top.
LAZY = {
    "rlhf_cli.cli": "the CLI loads a command's modules when it runs (--help imports no torch)",
    "rlhf_cli.commands": "the same",
    "rlhf_cli.core.errors": "the console (rich) only when an error is printed",
    "rlhf_cli.tools.plan": "the plan's formulas run without torch; constants from model code",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PKG.rglob("*.py"))}


def imports(trees: dict[str, ast.Module]) -> list[tuple[str, str, str | None, bool, int]]:
    """(importer, imported module, imported name or None, at module level, line) for every
    import of rlhf_cli anywhere in a module."""
    out = []
    for name, tree in trees.items():
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "rlhf_cli":
                        out.append((name, a.name, None, id(node) in top, node.lineno))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlhf_cli"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    if sub in trees:  # `from rlhf_cli.core import errors`: a module
                        out.append((name, sub, None, id(node) in top, node.lineno))
                    else:
                        out.append((name, node.module, a.name, id(node) in top, node.lineno))
    return out


def defined(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def violations(trees: dict[str, ast.Module]) -> list[str]:
    found = []
    unplaced = sorted(set(trees) - set(ORDER))
    found += [f"{m}: not in LAYERS (give it its place in tests/test_layers.py)" for m in unplaced]
    for src, dst, name, top, line in imports(trees):
        where = f"{src}:{line}"
        if dst not in trees:
            found.append(f"{where}: imports {dst}, which does not exist")
            continue
        if src in ORDER and dst in ORDER and ORDER[dst] >= ORDER[src] and src != dst:
            found.append(f"{where}: upward import of {dst} ({LAYER[dst]}) from {LAYER[src]}")
        if (
            dst.startswith("rlhf_cli.stages.")
            and not src.startswith("rlhf_cli.stages")
            and src != "rlhf_cli.stages"
        ):
            found.append(f"{where}: imports the stage module {dst}: use stages.stage_class")
        if name is not None and name != "*" and name not in defined(trees[dst]):
            found.append(f"{where}: imports {name} from {dst}, which does not define it")
        if not top and src not in LAZY:
            found.append(f"{where}: in-function import of {dst}: import it at the top")
    return found


def cycles(trees: dict[str, ast.Module]) -> list[list[str]]:
    """The import graph's cycles (strongly connected components of more than one module)."""
    graph: dict[str, set[str]] = {m: set() for m in trees}
    for src, dst, *_ in imports(trees):
        if dst in graph and dst != src:
            graph[src].add(dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_arrow_points_down_and_no_module_is_left_out():
    assert violations(modules()) == []


def test_the_import_graph_has_no_cycle():
    assert cycles(modules()) == []


def test_the_checks_catch_an_upward_import_a_cycle_a_stage_and_a_re_export():
    trees = modules()
    planted = dict(trees)
    # losses (L1) reaching up into the trainer; config (L1) closing a cycle with the loop
    planted["rlhf_cli.losses"] = ast.parse(
        ast.unparse(trees["rlhf_cli.losses"]) + "\nfrom rlhf_cli.trainer.state import Position\n"
    )
    planted["rlhf_cli.config"] = ast.parse(
        ast.unparse(trees["rlhf_cli.config"]) + "\nfrom rlhf_cli.trainer.loop import Stage\n"
    )
    planted["rlhf_cli.tools.sample"] = ast.parse(
        ast.unparse(trees["rlhf_cli.tools.sample"])
        + "\nfrom rlhf_cli.stages.dpo import DPOStage\nfrom rlhf_cli.trainer.loop import move\n"
        + "def f():\n    from rlhf_cli.tools import policy\n"
    )
    found = violations(planted)
    assert any(
        "rlhf_cli.losses" in v and "upward import of rlhf_cli.trainer.state" in v for v in found
    )
    assert any("stage module rlhf_cli.stages.dpo" in v for v in found)
    assert any(
        "imports move from rlhf_cli.trainer.loop, which does not define it" in v for v in found
    )
    assert any("in-function import of rlhf_cli.tools.policy" in v for v in found)
    assert any({"rlhf_cli.config", "rlhf_cli.trainer.loop"} <= set(c) for c in cycles(planted))


def test_tests_and_scripts_import_each_name_from_where_it_is_defined():
    """No re-exports to lean on: a monkeypatch then hits the module that uses the name."""
    trees = modules()
    root = PKG.parent
    found = []
    for path in sorted([*root.glob("tests/*.py"), *root.glob("scripts/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlhf_cli"):
                for a in node.names:
                    if node.module not in trees:
                        found.append(f"{path.name}:{node.lineno}: no module {node.module}")
                    elif f"{node.module}.{a.name}" not in trees and a.name not in defined(
                        trees[node.module]
                    ):
                        found.append(f"{path.name}:{node.lineno}: {a.name} not in {node.module}")
    assert found == []


def test_no_module_is_over_700_lines_but_config():
    long = {
        module_name(p): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 700 and p.name != "config.py"
    }
    assert long == {}


def test_help_imports_no_torch():
    """`rlhf --help` (and `rlhf train --help`) load no torch, transformers or peft."""
    code = (
        "import sys\n"
        "from rlhf_cli.cli import main\n"
        "for argv in (['--help'], ['train', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'vllm') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "usage: rlhf train" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []"


@pytest.mark.parametrize("path", ["rlhf_cli.rewards:concise", "rlhf_cli.multiturn:CalculatorEnv"])
def test_user_facing_paths_stay(path):
    """The `module:name` strings users put in configs (reward.fn, stage.env) still resolve."""
    import importlib

    module, name = path.split(":")
    assert callable(getattr(importlib.import_module(module), name))
