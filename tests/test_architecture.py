"""The package's shape, as tools/check_imports.py checks it: no import cycle, no upward import, no import
inside a function but of an optional dependency (with a comment saying why), no function over 60 lines."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_check_imports_reports_no_problem():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "check_imports.py")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
