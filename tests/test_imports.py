"""The package's import structure: every module imports on its own, the
module-level imports form no cycle, and no part of the mirror imports the
`Mirror` class back (its parts get what they use through their
constructors)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import dstfuse

PACKAGE = Path(dstfuse.__file__).parent


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path], *, typing_too: bool) -> set[str]:
    """The package's modules `name` imports at module level (outside
    functions); `typing_too` includes those under `if TYPE_CHECKING:`."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for statement in statements:
            if isinstance(statement, ast.If):
                if "TYPE_CHECKING" in ast.unparse(statement.test) and not typing_too:
                    continue
                visit(statement.body)
                visit(statement.orelse)
            elif isinstance(statement, ast.Try):
                visit(statement.body)
                for handler in statement.handlers:
                    visit(handler.body)
                visit(statement.orelse)
            elif isinstance(statement, ast.Import):
                found.update(alias.name for alias in statement.names)
            elif isinstance(statement, ast.ImportFrom):
                base = package[: len(package) - statement.level + 1] if statement.level else []
                module = ".".join(base + ([statement.module] if statement.module else []))
                for alias in statement.names:
                    submodule = f"{module}.{alias.name}"
                    found.add(submodule if submodule in modules else module)

    visit(ast.parse(path.read_text()).body)
    return {module for module in found if module in modules and module != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in sorted(graph[module]):
            if other not in index:
                connect(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            connect(module)
    return cycles


def test_the_module_level_imports_form_no_cycle():
    modules = _modules()
    graph = {
        name: _imports(name, path, modules, typing_too=False) for name, path in modules.items()
    }
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_part_of_the_mirror_imports_the_mirror_back():
    modules = _modules()
    back = {
        name
        for name, path in modules.items()
        if name.startswith("dstfuse.mirror.")
        and name != "dstfuse.mirror.algorithm"
        and "dstfuse.mirror.algorithm" in _imports(name, path, modules, typing_too=True)
    }
    assert back == set()


def test_every_module_imports_on_its_own():
    """Each module first, in a fresh set of the package's modules: an
    import that works only after another module was loaded fails here."""
    script = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "dstfuse" or m.startswith("dstfuse.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("\\n".join(failed))
"""
    names = [name for name in _modules() if name != "dstfuse.__main__"]
    # The modules in a few interpreters at once (each still empties the
    # package's modules before every import); every one is imported.
    workers = max(2, min(4, os.cpu_count() or 2))
    chunks = [names[start::workers] for start in range(workers)]
    assert sorted(name for chunk in chunks for name in chunk) == sorted(names)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, *chunk],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for chunk in chunks
    ]
    try:
        results = [(process, *process.communicate(timeout=120)) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(30)
    for process, stdout, stderr in results:
        assert process.returncode == 0, stderr
        assert stdout.strip() == ""


def test_a_config_without_mirrors_never_imports_the_mirror(tmp_path):
    """Algorithms are imported when a storage names them; a mirror's
    config keys are looked up only for a mirror or a key some storage
    does not know."""
    (tmp_path / "disk").write_bytes(bytes(4096))
    config = tmp_path / "storage.yaml"
    config.write_text(
        f"storages:\n  vol0:\n    algorithm: linear\n    nodes:\n      - local: {tmp_path}/disk\n"
    )
    script = (
        "import sys\n"
        "from dstfuse.config import load_mount_config\n"
        "load_mount_config(sys.argv[1])\n"
        "print(sorted(m for m in sys.modules if m.startswith('dstfuse.mirror')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
