"""The README's walkthrough, run as written: its `build-llm` lines with their default flags and its Python
blocks, in order, on a text in the Greek alphabet made here (speeches of four speakers, each with words of
their own, so that "who speaks these lines?" can be learned).

train -> generate -> eval -> finetune instruct -> chat --prompt -> serve (one chat completion through the
`openai` client) -> export-hf (loaded back by `transformers`) -> the Python equivalent. Every step must exit 0
and print non-empty output of the kind it promises; the instruction fine-tune's loss must fall. The short
version (in `make test`) appends shorter budgets (SHORT) and uses fewer records; the full one (slow) runs the
commands exactly as the README writes them."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
import re
import shlex
from pathlib import Path

import pytest

from build_llm.cli import main
from tiny import Server

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- walkthrough", "<!-- /walkthrough -->"
# The short version's budget, appended (argparse keeps the last value of a repeated flag): 20 steps of 8
# windows instead of the 5-minute time budget, whose probes alone take longer than this test should.
SHORT = {"train": ["--steps", "20", "--batch-size", "8"]}
GREEK = re.compile("[\u0370-\u03ff]")

SPEAKERS = {
    "ΑΝΤΙΓΟΝΗ": ("ο αδελφός μου", "η ταφή", "οι θεοί", "η αγάπη", "το χώμα", "η νύχτα"),
    "ΚΡΕΩΝ": ("ο νόμος", "η πόλη", "ο θρόνος", "η τάξη", "ο στρατός", "το κράτος"),
    "ΙΣΜΗΝΗ": ("ο φόβος", "η αδελφή μου", "τα δάκρυα", "η σιωπή", "η μητέρα", "το σπίτι"),
    "ΧΟΡΟΣ": ("ο άνθρωπος", "η θάλασσα", "ο χρόνος", "η μοίρα", "ο ήλιος", "τα βουνά"),
}
VERBS = ("φωνάζει", "κρατά", "ζητά", "θυμάται", "φέρνει", "κοιτάζει", "ακούει")
ENDS = ("απόψε", "για πάντα", "μπροστά μας", "χωρίς φόβο", "στην αυλή", "ως το πρωί")


def speech(rng: random.Random, speaker: str) -> str:
    words = SPEAKERS[speaker]
    lines = [f"{rng.choice(words).capitalize()} {rng.choice(VERBS)} {rng.choice(words)} {rng.choice(ENDS)}."
             for _ in range(rng.randint(1, 3))]
    return " ".join(lines)


def play(rng: random.Random, n_speeches: int) -> str:
    return "".join(f"{s}:\n{speech(rng, s)}\n\n" for s in (rng.choice(list(SPEAKERS)) for _ in range(n_speeches)))


def write_inputs(where: Path, n_speeches: int, n_records: int) -> None:
    """my-text/ (two files: the held-out split must represent both), held-out.txt, instructions.jsonl."""
    rng = random.Random(0)
    (where / "my-text").mkdir()
    for name in ("first.txt", "second.txt"):
        (where / "my-text" / name).write_text(play(rng, n_speeches), encoding="utf-8")
    (where / "held-out.txt").write_text(play(random.Random(1), n_speeches // 10), encoding="utf-8")
    records = []
    for _ in range(n_records):
        s = rng.choice(list(SPEAKERS))
        records.append({"messages": [{"role": "user", "content": f"Who speaks these lines? {speech(rng, s)}"},
                                     {"role": "assistant", "content": s}]})
    (where / "instructions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                                             encoding="utf-8")


def walkthrough_steps(path: Path = ROOT / "README.md") -> list[tuple[str, str]]:
    """("command", line) for each `build-llm` line of a bash block and ("python", code) for each Python
    block of the walkthrough section, in order."""
    text = path.read_text(encoding="utf-8")
    assert START in text and END in text, f"{path.name} has no walkthrough section"
    section = text[text.index(START):text.index(END)]
    steps = []
    for indent, lang, body in re.findall(r"^( *)```(\w*)\n(.*?)^ *```", section, flags=re.S | re.M):
        lines = [line[len(indent):] for line in body.splitlines()]  # a block inside a list item is indented
        if lang == "python":
            steps.append(("python", "\n".join(lines)))
        elif lang == "bash":  # a block without a language shows what a command prints
            steps += [("command", line) for line in lines if line.startswith("build-llm ")]
    return steps


def run_command(line: str, short: bool, capsys) -> str:
    argv = shlex.split(line, comments=True)[1:]
    if short:
        argv += SHORT.get(argv[0], [])
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, (line, err[-3000:])
    return out


def check_command(argv0: str, out: str) -> None:
    """What each verb promises to print, beyond exiting 0."""
    if argv0 == "train":
        assert Path("runs/mine/checkpoint/model.safetensors").is_file()
    elif argv0 == "generate":
        assert len(GREEK.findall(out)) >= 10, out  # the model writes the alphabet it learned
    elif argv0 == "eval":
        result = json.loads(out)  # uniform over bytes is 8 bits a byte; a model of this text is far below
        assert math.isfinite(result["loss"]) and 0 < result["bits_per_byte"] < 4, result
    elif argv0 == "finetune":
        rows = [json.loads(r) for r in Path("runs/mine-sft/metrics.jsonl").read_text().splitlines() if r.strip()]
        val = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
        assert len(val) >= 2 and val[-1] < val[0], rows  # the instruction fine-tune learns
    elif argv0 == "chat":
        assert out.strip(), "chat --prompt printed no reply"
    elif argv0 == "export-hf":
        assert Path("runs/mine-hf/config.json").is_file()


def run_python(code: str, server: Server | None) -> str:
    if "OpenAI(" in code:
        assert server is not None, "the openai block comes before `build-llm serve`"
        code = code.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md (walkthrough)", "exec"), {"__name__": "__walkthrough__"})
    assert printed.getvalue().strip(), f"the block printed nothing:\n{code}"
    return printed.getvalue()


def run_walkthrough(tmp_path: Path, monkeypatch, capsys, short: bool) -> None:
    pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e '.[test]')")
    pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e '.[test]')")
    write_inputs(tmp_path, n_speeches=600 if short else 6000, n_records=48 if short else 400)
    monkeypatch.chdir(tmp_path)
    server, ran = None, []
    try:
        for kind, step in walkthrough_steps():
            if kind == "python":
                run_python(step, server)
            elif step.startswith("build-llm serve "):
                server = Server(*shlex.split(step, comments=True)[2:])  # as the README writes it
            else:
                check_command(shlex.split(step, comments=True)[1], run_command(step, short, capsys))
            ran.append(shlex.split(step, comments=True)[1] if kind == "command" else "python")
    finally:
        if server is not None:
            assert server.stop() == 0
    assert ran[:6] == ["train", "generate", "eval", "finetune", "chat", "serve"], ran
    assert "export-hf" in ran and ran.count("python") >= 3, ran


def test_the_walkthrough_runs_shortened(tmp_path, monkeypatch, capsys):
    run_walkthrough(tmp_path, monkeypatch, capsys, short=True)


@pytest.mark.slow  # the README's own budgets: a 5-minute training run and a full fine-tune
def test_the_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys):
    run_walkthrough(tmp_path, monkeypatch, capsys, short=False)


def test_the_portuguese_guide_walks_the_same_commands():
    def commands(path):
        return [shlex.split(s, comments=True) for kind, s in walkthrough_steps(path) if kind == "command"]
    assert commands(ROOT / "docs" / "guia-rapido.md") == commands(ROOT / "README.md")
