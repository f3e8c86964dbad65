"""The repository stands on its own: its docs link only to files inside it, and those exist."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from core.paths import PROJECT_ROOT

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # markdown [text](target)


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (an unpacked source tree): every file
        return [p for p in PROJECT_ROOT.rglob("*") if p.is_file() and ".git" not in p.parts
                and ".venv" not in p.parts]
    return [PROJECT_ROOT / line for line in out.stdout.splitlines() if (PROJECT_ROOT / line).is_file()]


MARKDOWN = [p for p in tracked_files() if p.suffix == ".md"]


def test_the_docs_a_reader_needs_are_in_the_repository():
    for name in ("README.md", "docs/METHOD.md", "docs/SEED_DEFECTS.md", "docs/CONTRACTS.md"):
        assert (PROJECT_ROOT / name).is_file(), name
    readme = (PROJECT_ROOT / "README.md").read_text()
    for doc in ("docs/METHOD.md", "docs/SEED_DEFECTS.md", "docs/CONTRACTS.md"):
        assert f"]({doc})" in readme, f"README does not link {doc}"


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_relative_links_resolve_inside_the_repository(doc):
    root = PROJECT_ROOT.resolve()
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto: ...
            continue
        path = (doc.parent / target).resolve()
        assert root in path.parents or path == root, f"{doc.name}: link {target} leaves the repository"
        assert path.exists(), f"{doc.name}: link {target} names no file"


def test_no_file_points_beside_the_checkout():
    """Nothing tracked names the sibling folder the project's working notes came from."""
    pattern = re.compile(r"\.\./shared/")
    hits = []
    for path in tracked_files():
        if path.suffix in {".png", ".jpg", ".mp4", ".parquet"} or path == Path(__file__).resolve():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        hits += [f"{path.relative_to(PROJECT_ROOT)}:{n}" for n, line in enumerate(text.splitlines(), 1)
                 if pattern.search(line)]
    assert not hits, hits
