"""Layering: the package's imports form no cycle (module level and inside functions alike), the config does not
load the built-in data generator, and the method registry finds every method file by itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import semssl

PACKAGE = Path(semssl.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                # `from pkg import sub` imports the submodule pkg.sub when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def test_the_package_has_no_import_cycle() -> None:
    graph = _import_graph()
    assert len(graph) > 50 and graph["semssl.engine.run"]  # the graph was read
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_lower_layers_do_not_import_the_upper_ones() -> None:
    order = ["semssl.errors", "semssl.distributed", "semssl.optim", "semssl.schedules", "semssl.data",
             "semssl.models", "semssl.losses", "semssl.methods", "semssl.config", "semssl.checkpoints",
             "semssl.eval", "semssl.viz", "semssl.engine", "semssl.transfer", "semssl.bench",
             "semssl.reproduce_tables", "semssl.reproduce", "semssl.cli_transfer", "semssl.cli"]

    def layer(module: str) -> int:
        return max(i for i, prefix in enumerate(order) if module == prefix or module.startswith(prefix + "."))

    upward = [f"{a} -> {b}" for a, targets in _import_graph().items() if a.count(".") and a != "semssl.__main__"
              for b in targets if b.count(".") and layer(b) > layer(a)]
    assert upward == [], upward


def test_the_config_does_not_load_the_data_generator() -> None:
    code = ("import sys, semssl.config; bad = [m for m in ('pycocotools', 'semssl.data.synthetic.build', "
            "'semssl.data.synthetic.render', 'lightning') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_registry_finds_every_method_file() -> None:
    from semssl.methods import available_methods, method_class

    files = {p.stem for p in (PACKAGE / "methods").glob("*.py") if p.stem not in ("__init__", "base")}
    found = {method_class(name).__module__.rpartition(".")[2] for name in available_methods()}
    assert found == files
