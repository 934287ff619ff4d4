"""The two seed notebooks, rewritten as scripts in examples/, run to the end (quick settings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, env: dict[str, str], cwd: Path) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_gpt_model_example_prints_the_seed_numbers(tmp_path):
    out = _run("gpt_model.py", {}, tmp_path)
    assert out.count("same as the seed") == 5 and "DIFFERS" not in out
    assert "Total parameters: 163,009,536" in out and "Size: 621.83 MB (fp32)" in out
    assert "O gato sobe no Dice eighty Driverfoundland Garner 19" in out


def test_abc_markov_example_trains_generates_and_draws(tmp_path):
    out = _run("abc_markov.py", {"ABC_STEPS": "10", "ABC_WORDS": "1500", "ABC_NEW_TOKENS": "30",
                                 "ABC_OUT": str(tmp_path / "run"), "OMP_NUM_THREADS": "1"}, tmp_path)
    assert "['<PAD>', '\\n', 'A', 'B', 'C']" in out
    assert "[2, 3, 2, 4, 1, 4]" in out  # the notebook's encoding of "ABAC\nC", from 0
    assert "Total parameters: 400,128" in out
    assert "step   10: train" in out
    gap_rows = [line for line in out.splitlines() if line[:3].strip().isdigit() and line.count(".") == 3]
    assert len(gap_rows) == 16  # one row per window position
    assert "exact 0.1273" in out  # P(C | "A") under the source: the optimum is printed beside the model
    for name in ("inspect/attention.png", "inspect/next_token.png", "inspect/layers.png", "surprisal.html",
                 "loss.png", "checkpoint/model.safetensors"):
        assert (tmp_path / "run" / name).stat().st_size > 0, name
