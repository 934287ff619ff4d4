"""The commands of the README and of every docs/ page, copied out of them and run (shortened) in a fresh
copy of the repository.

Every line of a fenced block that starts with `build-llm` is run through `build_llm.cli.main` in
that copy (the convention: an activated environment, one command per line), README first, then the
pages in PAGES' order (a page's commands may read the runs of an earlier page's). SHORTEN makes
them quick: a `train` gets --steps 2 and a tiny model, generation a few tokens. The inputs the
pages name are small generated texts. A line marked `# needs: ...` is skipped; the lines of a
walkthrough section (`<!-- walkthrough` ... `<!-- /walkthrough -->`) are run as written, on their own
inputs, by tests/test_walkthrough.py; `python examples/...` lines are run by the slow test
(tests/test_examples.py runs the same scripts)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from build_llm.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--eval-every", "2", "--eval-batches", "1", "--batch-size", "4", "--context-length", "16", "--emb-dim", "16",
        "--n-layers", "1", "--n-heads", "2"]
# (pattern of the command, arguments appended: argparse keeps the last value of a repeated flag)
SHORTEN = [
    (r"^train .*--resume", ["--steps", "4"]),
    (r"^train .*--time-budget", ["--time-budget", "10s", *TINY]),  # explicit shape: the budget sets the steps
    (r"^train ", ["--steps", "2", *TINY]),
    (r"^generate ", ["--max-new-tokens", "5"]),
    (r"^doctor ", ["--steps", "5"]),
    (r"^tokenizer train ", ["--vocab-size", "300"]),
]


# docs/ pages in the order their commands run (training writes the runs the others read); any other page
# after them, sorted.
PAGES = ["training", "generation-and-serving", "fine-tuning", "inspecting", "book", "interop", "scale",
         "performance", "guia-rapido"]


def documents() -> list[Path]:
    """README.md, then every docs/ page: PAGES first, the others sorted."""
    pages = [ROOT / "docs" / f"{name}.md" for name in PAGES]
    return [ROOT / "README.md", *pages, *sorted(set((ROOT / "docs").glob("*.md")) - set(pages))]


def readme_commands(prefix: str) -> list[str]:
    """Lines of the fenced blocks of README.md and the docs/ pages that start with `prefix`, outside a
    walkthrough section."""
    lines = []
    for path in documents():
        inside = walkthrough = False
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("<!-- walkthrough") or line.startswith("<!-- /walkthrough"):
                walkthrough = not line.startswith("<!-- /")
            elif line.startswith("```"):
                inside = not inside
            elif inside and not walkthrough and line.startswith(prefix):
                lines.append(line)
    return lines


def test_every_page_exists_and_links_resolve():
    """The README's table of contents and the pages' relative links point at files that exist."""
    for path in documents():
        assert path.is_file(), path
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to missing {target}"


def as_argv(line: str) -> list[str] | None:
    """The arguments of a README command line, shortened; None for a line that is not one to run."""
    if "# needs:" in line:
        return None
    try:
        words = shlex.split(line.replace("$'", "'").replace("\\n", "\n"), comments=True)
    except ValueError:
        return None
    if not words or words[0] != "build-llm" or any(w.startswith("(") for w in words):
        return None  # a line of output shown in a block, not a command
    argv = words[1:]
    for pattern, extra in SHORTEN:
        if re.search(pattern, " ".join(argv)):
            argv += extra
            break
    return argv


def fresh_copy(tmp_path: Path) -> Path:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout: cannot make a fresh copy of the tracked files")
    copy = tmp_path / "repo"
    for name in files:
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    text = "To be, or not to be, that is the question. It was the best of times, the worst of times.\n" * 30
    pt = "Era uma vez um gato que subia no telhado e olhava a lua sobre a cidade.\n" * 30
    (copy / "book.txt").write_text(text)
    (copy / "held-out.txt").write_text(text[: len(text) // 2])
    (copy / "corpus").mkdir()
    (copy / "corpus" / "a.txt").write_text(text)
    (copy / "corpus-pt").mkdir()
    (copy / "corpus-pt" / "a.txt").write_text(pt)
    (copy / "held-out-pt.txt").write_text(pt[:500])
    return copy


@pytest.mark.slow  # a dozen shortened runs: over a minute on a shared 2-core machine
def test_the_readme_commands_run_as_written(tmp_path, monkeypatch, capsys):
    copy = fresh_copy(tmp_path)
    monkeypatch.chdir(copy)
    ran, skipped = [], []
    # `make demo` first: the README's inspect/surprisal/doctor lines read its run
    demo = ["train", "--out", "runs/abc-demo", "--steps", "2", *TINY]
    commands = [demo] + [a for a in map(as_argv, readme_commands("build-llm")) if a is not None]
    skipped = [line for line in readme_commands("build-llm") if as_argv(line) is None]
    for argv in commands:
        if argv == ["train", "--out", "runs/abc-demo", "--steps", "2", *TINY] and argv is not demo:
            continue  # the Quick start's own line for what make demo runs: done above
        code = main(argv)
        err = capsys.readouterr().err
        allowed = (0, 1) if argv[0] == "doctor" else (0,)  # doctor's exit 1 is a failed check, not an error
        assert code in allowed, (argv, err)
        ran.append(argv[0])
    assert {"info", "generate", "train", "eval", "inspect", "surprisal", "doctor", "export-hf", "tokenizer"} <= set(ran)
    assert all("# needs:" in line or "(" in line for line in skipped), skipped


@pytest.mark.slow
def test_the_readme_example_scripts_run(tmp_path):
    copy = fresh_copy(tmp_path)
    for line in [line for line in readme_commands("python examples/") if "# needs:" not in line] + [
            w for path in documents() for line in path.read_text(encoding="utf-8").splitlines()
            for w in re.findall(r"`(python examples/[\w/]+\.py)`", line)]:
        script = shlex.split(line, comments=True)[1]
        proc = subprocess.run([sys.executable, script], cwd=copy, capture_output=True, text=True, timeout=1800,
                              env={**os.environ, "MPLBACKEND": "Agg"})
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
