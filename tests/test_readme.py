"""The README's first-screen commands stay true: CI runs the test command verbatim."""

import re

from conftest import REPO


def readme_commands():
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_first_screen_has_quickstart_and_test_commands():
    quickstart, tests = readme_commands()[:2]
    assert quickstart.endswith("python -m melanoma_tf.train --config configs/quickstart.yaml")
    assert "pip install" in quickstart and "pip install" in tests
    assert "pytest" in tests
    assert (REPO / "configs" / "quickstart.yaml").is_file()
    first_screen = (REPO / "README.md").read_text().splitlines()[:15]
    assert any(tests in line for line in first_screen)


def test_ci_runs_the_readme_test_command():
    _, tests = readme_commands()[:2]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci
