"""Dependencies point one way: flows -> tasks -> core (``driftloop/``). The CLI and the
demo are entry points on top and may import anything."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = {"cli", "demo.py"}  # the CLI package and the demo, under driftloop/


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (absolute names;
    ``from driftloop import tasks`` counts as ``driftloop.tasks``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def violations(folder: str, forbidden: tuple[str, ...], skip: set[str] = frozenset()) -> list[str]:
    out = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        if path.relative_to(ROOT / folder).parts[0] in skip:
            continue
        for module in sorted(imported_modules(path)):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                out.append(f"{path.relative_to(ROOT)} imports {module}")
    return out


def test_core_imports_neither_tasks_nor_flows() -> None:
    assert violations("driftloop", ("driftloop.tasks", "driftloop.flows"), ENTRY_POINTS) == []


def test_tasks_and_blocks_never_import_flows() -> None:
    assert violations("tasks", ("driftloop.flows",)) == []
    assert violations("blocks", ("driftloop.flows", "driftloop.tasks")) == []


def test_the_check_sees_a_lazy_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from driftloop import tasks\n    import driftloop.flows.train\n")
    assert {"driftloop.tasks", "driftloop.flows.train"} <= imported_modules(module)


def test_an_edge_agent_starts_without_prefect_the_registry_or_training_libraries() -> None:
    """What ``driftloop edge score`` imports to score (tasks/README.md): a fresh
    interpreter, so nothing another test imported can hide a dependency."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from driftloop.tasks.edge import ChannelSource\n"
        "from driftloop.tasks.edge_agent import AgentConfig, run_agent\n"
        "from driftloop.tasks.score import score_stream\n"
        "heavy = ('prefect', 'driftloop.registry', 'alembic', 'sklearn', 'xgboost', 'lightgbm', 'nannyml', 'optuna')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith('driftloop.registry')))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "[]", done.stdout
