"""The package's shape: one error base class, one way a command ends, no import cycles."""

import ast
import importlib
import inspect
import subprocess

import pytest

from conftest import REPO
from melanoma_tf.cli import run_main
from melanoma_tf.errors import MelanomaTfError

PACKAGE = REPO / "melanoma_tf"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def _imports(path) -> set[str]:
    """melanoma_tf modules a file imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "melanoma_tf":
                found |= {a.name for a in node.names}
            elif node.module.startswith("melanoma_tf."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("melanoma_tf.")}
    return (found & set(MODULES)) - {path.stem}


def test_no_import_cycles():
    graph = {m: _imports(PACKAGE / f"{m}.py") for m in MODULES}

    def reaches(start, target, seen):
        for nxt in graph[start]:
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    cycles = [m for m in MODULES if reaches(m, m, {m})]
    assert cycles == [], {m: sorted(graph[m]) for m in cycles}


def test_every_error_class_derives_from_the_project_error():
    errors = {}
    for name in MODULES:
        module = importlib.import_module(f"melanoma_tf.{name}")
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, Exception):
                errors[f"{name}.{cls_name}"] = cls
    assert len(errors) >= 10, sorted(errors)
    assert [n for n, cls in errors.items() if not issubclass(cls, MelanomaTfError)] == []


def test_run_main_prints_the_last_line_or_one_error_line(capsys):
    assert run_main(lambda: "run: somewhere") == 0
    assert capsys.readouterr().out.strip() == "run: somewhere"

    def bad_key():
        from melanoma_tf.config import ConfigError

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
    for name in ("train", "evaluate", "quantize", "baselines", "sweep", "export_app"):
        source = (PACKAGE / f"{name}.py").read_text()
        main = source[source.index("def main("):]
        assert "run_main(" in main and "logging.basicConfig" not in source and 'print(f"error' not in main, name
