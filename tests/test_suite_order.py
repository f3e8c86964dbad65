"""The suite's schedule: `make test` spreads modules over pytest-xdist workers, longest first."""
from __future__ import annotations

import re
from pathlib import Path

from conftest import LONGEST_MODULES, ROOT


def test_every_listed_long_module_exists_once():
    assert len(set(LONGEST_MODULES)) == len(LONGEST_MODULES)
    missing = [name for name in LONGEST_MODULES if not (Path(__file__).parent / f"{name}.py").is_file()]
    assert not missing, f"tests/conftest.LONGEST_MODULES names modules that are gone: {missing}"


def test_make_test_keeps_modules_whole_and_in_the_conftest_order():
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    pytest_line = next(line for line in recipe.splitlines() if "-m pytest" in line)
    # loadfile: a module's fixtures are built once, on one worker; no reorder: conftest's order holds
    assert "--dist loadfile" in pytest_line and "--no-loadscope-reorder" in pytest_line, pytest_line
    assert "-n $(TEST_WORKERS)" in pytest_line


def test_collection_puts_the_long_modules_first(pytestconfig):
    order = pytestconfig.loopy_module_order  # the modules of this run, as conftest sorted them
    listed = [stem for stem in order if stem in LONGEST_MODULES]
    assert listed == [name for name in LONGEST_MODULES if name in listed]
    assert order[:len(listed)] == listed and "test_suite_order" in order
