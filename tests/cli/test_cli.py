"""The command line: stdout carries only the result; bad input is one stderr line and exit 2."""

import os
import subprocess
import sys

import pytest

from build_llm.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "build_llm.cli", *args], capture_output=True, text=True, timeout=300)


def test_a_verb_without_templates_or_a_server_starts_without_jinja2_and_uvicorn():
    """jinja2 is imported with the first chat template, uvicorn (and click) when `serve` runs: every other verb
    starts without them (they were the largest imports of a start after torch and numpy)."""
    code = ("import sys; from build_llm.cli import main; main(['info', '--preset', 'r-abc']); "
            "print(sorted(m for m in ('jinja2', 'uvicorn', 'click') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]"


def test_info_prints_the_table_total_and_sizes(capsys):
    assert main(["info", "--preset", "r-abc"]) == 0
    out = capsys.readouterr().out
    assert "trf_blocks.0.att.W_qkv.weight" in out and "384 x 128" in out
    assert "Total parameters: 400,128" in out
    assert "Size: 1.53 MB (fp32), 0.76 MB (bf16)" in out


def test_info_defaults_to_the_seed_model(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "Total parameters: 163,009,536" in out and "621.83 MB (fp32)" in out


def test_info_of_a_mixture_of_experts_counts_total_and_active_without_allocating(capsys):
    assert main(["info", "--preset", "qwen3-30b-a3b"]) == 0  # 57 GiB in bf16: only the meta device holds it
    out = capsys.readouterr().out
    assert "trf_blocks.47.ff.fc1" in out and "128 x 768 x 2048" in out
    assert "Total parameters: 30,532,122,624" in out
    idle = 48 * (128 - 8) * 3 * 2048 * 768  # per layer, 120 experts of three 2048 x 768 matrices not used
    assert f"Active parameters per token: {30_532_122_624 - idle:,} (8 of 128 experts per layer)" in out


def test_generate_with_a_random_preset_prints_only_the_text():
    # A subprocess, as a user runs it: nothing but the text on stdout.
    result = run("generate", "--preset", "gpt2-small", "--prompt", "Hello, I am", "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Hello, I am") and len(lines[0]) > len("Hello, I am")


def test_generate_is_seeded(capsys):
    args = ["generate", "--preset", "gpt2-small", "--prompt", "A", "--max-new-tokens", "4", "--temperature", "1.0"]
    outputs = []
    for seed in ("3", "3", "4"):
        assert main([*args, "--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]  # the same seed draws the same tokens
    assert outputs[2] != outputs[0]  # another seed draws others: the seed is used, not ignored


@pytest.mark.parametrize("args, words", [
    (["info", "--preset", "gpt5"], ["invalid choice: 'gpt5'", "gpt2-small"]),
    (["generate", "--preset", "gpt2-small", "--prompt", ""], ["--prompt is empty", "leave --prompt out"]),
    (["generate", "--preset", "gpt2-small", "--prompt", "x", "--top-k", "0"], ["--top-k", "expected an integer >= 1"]),
    (["generate", "--preset", "gpt2-small", "--prompt", "x", "--temperature", "-1"], ["--temperature=-1.0"]),
    (["generate", "--preset", "gpt2-small", "--prompt", "x", "--top-p", "2"], ["--top-p=2.0", "(0, 1]"]),  # the flags, not the names
    (["generate", "--checkpoint", "no/such/dir", "--prompt", "x"], ["'no/such/dir' does not exist"]),
    (["generate", "--preset", "r-abc", "--prompt", "x"], ["not in the vocabulary: 'x'", "'A', 'B', 'C'"]),
    (["bogus"], ["invalid choice: 'bogus'"]),
])
def test_bad_input_is_one_line_and_exit_2(args, words, capsys):
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and "\n" not in err and "Traceback" not in err
    for word in words:
        assert word in err


def test_every_verb_has_help():
    from build_llm.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    for verb in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0


def test_bare_command_prints_help_and_succeeds(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: build-llm") and "generate" in out and "train" in out


def test_version_and_help_show_defaults(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"build-llm {version('build-llm')}"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: 50)" in help_text and "(default: auto)" in help_text


def test_every_verb_has_the_same_device_default():
    from build_llm.cli import DEVICE_DEFAULT, build_parser

    defaults = set()
    for action in build_parser()._subparsers._group_actions[0].choices.values():
        for a in action._actions:
            if a.dest == "device":
                defaults.add(a.default)
    assert defaults == {DEVICE_DEFAULT}


def test_a_reader_that_stops_reading_is_no_error(tmp_path):
    # `build-llm info ... | head -1`: it printed "build-llm: error: Broken pipe" and exited 2.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "build_llm.cli", "info", "--preset", "gpt2-small"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before the interpreter has started: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err  # 128 + SIGPIPE, as `yes | head` exits, and silent

