"""The package's shape: one error base class, one way a command ends, no import cycles, thin commands."""

import ast
import importlib
import inspect
import subprocess

import pytest

from conftest import REPO
from melanoma_tf.cli import run_main
from melanoma_tf.config import ConfigError
from melanoma_tf.errors import MelanomaTfError

PACKAGE = REPO / "melanoma_tf"
# Every module of the package by dotted name (a subpackage's __init__ by the package's name).
MODULES = sorted(".".join(("melanoma_tf",) + p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
                 for p in PACKAGE.rglob("*.py"))
# A command is a module that runs as ``python -m melanoma_tf.<name>`` (it has a ``__main__`` block).
COMMANDS = tuple(sorted(p.stem for p in PACKAGE.glob("*.py") if 'if __name__ == "__main__"' in p.read_text()))


def _path(module: str):
    relative = PACKAGE.joinpath(*module.split(".")[1:])
    return relative / "__init__.py" if relative.is_dir() else relative.with_suffix(".py")


def _imported(node) -> set[str]:
    """The package modules one import statement loads (``from pkg import mod`` names ``pkg.mod``)."""
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("melanoma_tf"):
        names = {f"{node.module}.{a.name}" for a in node.names}
        return {n for n in names if n in MODULES} or {node.module}
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.startswith("melanoma_tf")}
    return set()


def _imports(module: str) -> set[str]:
    """Package modules a module imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(_path(module).read_text())):
        found |= _imported(node)
    return (found & set(MODULES)) - {module}


def _functions(module: str):
    for node in ast.walk(ast.parse(_path(module).read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_import_cycles():
    graph = {m: _imports(m) for m in MODULES}
    assert {"melanoma_tf.config.schema", "melanoma_tf.distill.kd", "melanoma_tf.explain"} <= set(graph)

    def reaches(start, target, seen):
        for nxt in graph[start]:
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    cycles = [m for m in MODULES if reaches(m, m, {m})]
    assert cycles == [], {m: sorted(graph[m]) for m in cycles}


def test_no_command_is_imported_by_the_package():
    """Commands are thin ends: nothing in the package uses one as a library (report is a library, compare its
    command)."""
    assert {"train", "evaluate", "compare", "yardstick", "sweep"} <= set(COMMANDS) and "report" not in COMMANDS
    users = {m: sorted(_imports(m) & {f"melanoma_tf.{c}" for c in COMMANDS}) for m in MODULES}
    assert {m: used for m, used in users.items() if used} == {}


def test_package_links_are_visible_at_the_top_of_each_module():
    """No function imports a package module (such imports hid the cycles and the command-as-library uses)."""
    hidden = [f"{m}.{f.name}: {sorted(_imported(node))}" for m in MODULES for f in _functions(m)
              for node in ast.walk(f) if _imported(node)]
    assert hidden == []


def test_no_function_is_longer_than_80_lines():
    long = {f"{m}.{f.name}": f.end_lineno - f.lineno + 1 for m in MODULES for f in _functions(m)
            if f.end_lineno - f.lineno + 1 > 80}
    assert long == {}


def test_every_error_class_derives_from_the_project_error():
    errors = {}
    for name in MODULES:
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, Exception):
                errors[f"{name}.{cls_name}"] = cls
    assert len(errors) >= 10, sorted(errors)
    assert [n for n, cls in errors.items() if not issubclass(cls, MelanomaTfError)] == []


def test_run_main_prints_the_last_line_or_one_error_line(capsys):
    assert run_main(lambda: "run: somewhere") == 0
    assert capsys.readouterr().out.strip() == "run: somewhere"

    def bad_key():
        raise ConfigError("train.lr: expected a number, got 'fast'")

    assert run_main(bad_key) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: train.lr: expected a number, got 'fast'"]

    def missing():
        raise FileNotFoundError("model file not found: x.keras")

    assert run_main(missing) == 2 and "x.keras" in capsys.readouterr().err

    def child_failed():
        raise subprocess.CalledProcessError(3, ["python", "-m", "melanoma_tf.evaluate"])

    assert run_main(child_failed) == 1 and "melanoma_tf.evaluate" in capsys.readouterr().err

    def bug():
        raise KeyError("a programming error is not hidden")

    with pytest.raises(KeyError):
        run_main(bug)


def test_commands_share_one_main():
    """No command writes its own logging set-up or error printing: they all end in run_main."""
    for name in COMMANDS:
        source = (PACKAGE / f"{name}.py").read_text()
        main = source[source.index("def main("):]
        assert "run_main(" in main and "logging.basicConfig" not in source and 'print(f"error' not in main, name
