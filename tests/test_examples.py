"""The two seed notebooks, rewritten as scripts in examples/, run to the end (quick settings)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "shakespeare.txt"
TINY_FINETUNE = {"FT_VOCAB": "300", "FT_CONTEXT": "512", "FT_EMB": "32", "FT_LAYERS": "1", "FT_HEADS": "2",
                 "FT_PRETRAIN_STEPS": "4", "FT_PRETRAIN_BATCH": "4", "FT_PASSAGES_PER_PLAY": "3",
                 "FT_CLS_EPOCHS": "1", "FT_QA_PER_PLAY": "3", "FT_QA_TEST": "6", "FT_QA_STEPS": "2",
                 "FT_LORA_STEPS": "2", "OMP_NUM_THREADS": "1"}


def _finetune_example(env: dict[str, str], tmp_path: Path) -> str:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent (the example's text)")
    pytest.importorskip("sklearn")
    return _run("shakespeare_finetune.py", {**env, "FT_OUT": str(tmp_path / "ft"), "FT_TEXT": str(SHAKESPEARE)},
                tmp_path)


def test_shakespeare_finetune_example_data():
    """The example's plays, genres, held-out split and exactly checkable answers."""
    import pytest

    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent (the example's text)")
    sys.path.insert(0, str(EXAMPLES))
    try:
        import shakespeare_finetune as ex
    finally:
        sys.path.remove(str(EXAMPLES))
    plays = ex.parse_plays(SHAKESPEARE.read_text(encoding="utf-8"))
    assert len(plays) == 37 and all(len(p["speeches"]) > 400 for p in plays)
    assert __import__("collections").Counter(p["genre"] for p in plays) == {"comedy": 15, "tragedy": 12, "history": 10}
    train, test = ex.split_plays(plays)
    assert len(test) == 10 and not {p["title"] for p in train} & {p["title"] for p in test}
    hamlet = next(p for p in plays if p["title"].startswith("HAMLET"))
    assert hamlet["speeches"][0] == ("Ber", ["Who's there?"])
    assert hamlet["text"].startswith("HAMLET, PRINCE OF DENMARK\n") and "Who's there?" in hamlet["text"]
    assert sum(len(p["text"]) for p in plays) > 0.95 * len(SHAKESPEARE.read_text(encoding="utf-8"))
    assert not any(t["title"] in p["text"].split("\n", 1)[1] for p in train for t in test)  # no held-out play leaks
    assert test[0]["title"] == "ALL'S WELL THAT ENDS WELL"  # a comedy
    records = ex.qa_records(test[0], 40)
    assert {r["instruction"] for r in records} == set(ex.QUESTIONS)
    for r in records:
        blocks = [block.split("\n") for block in r["input"].split("\n\n")]  # [speaker., line] each
        expected = {"Who speaks first in this passage?": blocks[0][0].rstrip("."),
                    "How many speeches are in this passage?": {2: "two", 3: "three", 4: "four"}[len(blocks)],
                    "Is a question asked in this passage?": "yes" if "?" in r["input"] else "no",
                    "Is this passage from a comedy, a tragedy or a history?": "comedy"}
        assert r["output"] == expected[r["instruction"]] and 2 <= len(blocks) <= 4


@pytest.mark.slow
def test_shakespeare_finetune_example_runs_every_step(tmp_path):
    """Tiny settings: every step runs and reports (the README's figures come from the default settings)."""
    out = _finetune_example(TINY_FINETUNE, tmp_path)
    assert "37 plays; held out: " in out and "TF-IDF + logistic regression" in out and "LoRA / full" in out
    results = __import__("json").loads((tmp_path / "ft" / "results.json").read_text())
    assert 0 <= results["classification"]["tfidf"] <= 1 and results["instructions"]["lora"]["trainable"] > 0


def test_shakespeare_finetune_example_without_the_text(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "shakespeare_finetune.py")], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "FT_TEXT": str(tmp_path / "absent.txt")}, timeout=120)
    assert proc.returncode == 0 and "skipped:" in proc.stdout and "absent" in proc.stdout
