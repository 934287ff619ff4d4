"""`make test` and `make test-slow` print each skipped test's reason, and are otherwise quiet: their
pytest flags (read from `make -n`, as make would run them) applied to a small suite with a skip."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SUITE = '''
import pytest

def test_passes():
    print("chatter that -q must keep out of the report")

@pytest.mark.skip(reason="the-reason-a-user-needs")
def test_skipped():
    pass

@pytest.mark.slow
@pytest.mark.skip(reason="a-slow-test-skipped")
def test_slow_skipped():
    pass
'''


def pytest_flags(target: str) -> list[str]:
    """The arguments `make TARGET` gives pytest (after `-m pytest`, up to a shell operator or comment)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    plan = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    line = next(line for line in plan.stdout.splitlines() if "-m pytest" in line)
    words = shlex.split(line.split("-m pytest", 1)[1], comments=True)
    return words[:words.index("||")] if "||" in words else words


@pytest.mark.parametrize("target, reason", [("test", "the-reason-a-user-needs"), ("test-slow", "a-slow-test-skipped")])
def test_make_test_prints_skip_reasons(tmp_path, target, reason):
    (tmp_path / "test_suite.py").write_text(SUITE, encoding="utf-8")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers = slow: slow\naddopts = -m 'not slow'\n", encoding="utf-8")
    flags = pytest_flags(target)
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *flags], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SKIPPED" in done.stdout and reason in done.stdout  # the reason, not only a count
    assert "chatter" not in done.stdout and "test_passes PASSED" not in done.stdout  # still quiet otherwise
