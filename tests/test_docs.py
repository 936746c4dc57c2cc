"""The documentation: the site builds with no warning (broken links fail), README's links exist, and its headline
table is what results/ says."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import readme_results  # noqa: E402


def test_docs_site_builds_strict_with_no_warnings(tmp_path):
    if not os.environ.get("CI"):  # the README's test command installs it; only a partial install may lack it
        pytest.importorskip("mkdocs", reason="mkdocs is in the dev extras")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING" not in result.stderr, result.stderr[-3000:]
    # The edge page is edge/README.md itself, included at build time.
    assert "TFLite-Micro harness" in (tmp_path / "site" / "edge" / "index.html").read_text()


def test_every_page_readme_links_exists_and_the_first_screen_is_short():
    text = (REPO / "README.md").read_text()
    links = [target for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text) if "://" not in target]
    assert len(links) >= 8
    missing = [target for target in links if not (REPO / target).exists()]
    assert missing == []
    assert len(text.splitlines()) < 120  # what it is, the two commands, one table, links: the rest is in docs/
    first_screen = "\n".join(text.splitlines()[:40])
    assert "python -m melanoma_tf.train --config configs/quickstart.yaml" in first_screen
    assert readme_results.START in text


def test_the_headline_table_is_made_from_results(tmp_path):
    assert readme_results.main(["--check"]) == 0
    stale = tmp_path / "README.md"
    stale.write_text((REPO / "README.md").read_text().replace("0.881 [", "0.891 [", 1))
    assert readme_results.main(["--check", "--readme", str(stale)]) == 1
    assert readme_results.main(["--readme", str(stale)]) == 0 and stale.read_text() == (REPO / "README.md").read_text()


def test_every_test_the_docs_name_exists():
    """The docs say which test holds each parity claim: every `tests/x.py::name` (and `::name` after it) exists."""
    named = []
    for page in [*sorted((REPO / "docs").glob("*.md")), REPO / "edge" / "README.md", REPO / "README.md"]:
        current = None
        for match in re.finditer(r"(tests/test_\w+\.py)?::(test_\w+)|(tests/test_\w+\.py)", page.read_text()):
            current = match.group(1) or match.group(3) or current
            if match.group(2):
                named.append((page.name, current, match.group(2)))
    assert len(named) >= 6
    for page, module, name in named:
        assert module is not None, (page, name)
        assert re.search(rf"^def {name}\(", (REPO / module).read_text(), re.M), f"{page}: {module}::{name}"
