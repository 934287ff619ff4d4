"""The red-team pass's bad inputs (issue 12): each is one clear line on stderr, exit code 2, no
traceback, nothing on disk changed; and a bug (an exception the package does not raise for users)
still shows its traceback."""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from build_llm import CharTokenizer, GPTConfig, GPTModel, save_checkpoint
from build_llm.store.checkpoint import load_trainer_state
from build_llm.cli import main
from build_llm.errors import UsageError
from build_llm.data.markov import ABC

TINY = GPTConfig(vocab_size=5, context_length=8, emb_dim=8, n_heads=2, n_layers=1, drop_rate=0.0)
ABC_TOKENIZER = CharTokenizer(["<PAD>", *ABC.alphabet])


def one_line_error(capsys, *argv, contains: str = "") -> str:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("build-llm"), captured.err
    assert "Traceback" not in captured.err
    assert contains in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def ckpt(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "c", GPTModel(TINY).eval(), ABC_TOKENIZER)


# --- config values -------------------------------------------------------------------------------
@pytest.mark.parametrize("key, value", [("ln_eps", math.nan), ("init_std", math.nan), ("ln_eps", math.inf),
                                        ("init_std", True), ("tie_weights", "false")])
def test_gpt_config_refuses_nan_infinity_and_strings_for_bools(key, value):
    with pytest.raises(ValueError, match=key):
        TINY.replace(**{key: value})


def test_a_hugging_face_config_with_a_string_bool_is_refused(tmp_path, capsys):
    from build_llm.interop.hf import config_from_hf

    hf = {"model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_layer": 1, "n_positions": 8, "vocab_size": 5,
          "tie_word_embeddings": "false"}
    with pytest.raises(ValueError, match="tie_weights='false'"):  # "false" was read as true
        config_from_hf(hf)


# --- sampling -----------------------------------------------------------------------------------
def test_sampling_flags_nan_are_refused(ckpt, capsys):
    one_line_error(capsys, "generate", "--checkpoint", ckpt, "--prompt", "A", "--temperature", "nan",
                   contains="temperature=nan")
    one_line_error(capsys, "generate", "--checkpoint", ckpt, "--prompt", "A", "--temperature", "inf",
                   contains="temperature=inf")
    one_line_error(capsys, "generate", "--checkpoint", ckpt, "--prompt", "A", "--temperature", "1", "--top-p", "nan",
                   contains="--top-p=nan")


def test_a_tiny_temperature_or_top_p_samples_the_most_likely_token(ckpt, capsys):
    # T -> 0 and top_p -> 0 both leave only the argmax: the tokens must equal greedy decoding's
    argv = ["generate", "--checkpoint", str(ckpt), "--prompt", "AB", "--max-new-tokens", "12"]
    assert main(argv + ["--greedy"]) == 0
    greedy = capsys.readouterr().out
    for extra in (["--temperature", "1e-45"], ["--temperature", "1", "--top-p", "1e-300"]):
        assert main(argv + extra) == 0, capsys.readouterr().err
        assert capsys.readouterr().out == greedy


def test_nan_weights_are_one_error_line_for_generate_and_inspect(tmp_path, capsys):
    model = GPTModel(TINY).eval()
    with torch.no_grad():
        model.out_head.weight.fill_(math.nan)
    ckpt = save_checkpoint(tmp_path / "nan", model, ABC_TOKENIZER)
    for extra in ([], ["--temperature", "1"]):
        one_line_error(capsys, "generate", "--checkpoint", ckpt, "--prompt", "A", *extra, contains="NaN")
    one_line_error(capsys, "inspect", "--checkpoint", ckpt, "--prompt", "AB", "--out", tmp_path / "i",
                   contains="not finite")
    assert not (tmp_path / "i").exists()


# --- tampered files -----------------------------------------------------------------------------
def test_deeply_nested_json_is_one_error_line(ckpt, capsys):
    (ckpt / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    one_line_error(capsys, "generate", "--checkpoint", ckpt, "--prompt", "A", contains="nests too deeply")


def test_a_config_far_larger_than_memory_is_refused_before_allocating(ckpt, capsys):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "vocab_size": 10**12}))
    one_line_error(capsys, "generate", "--checkpoint", ckpt, "--prompt", "A", contains="GiB of memory")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(ckpt, capsys):
    CharTokenizer(["<PAD>", *"ABCDEFGH"]).save(ckpt / "tokenizer.json")
    one_line_error(capsys, "generate", "--checkpoint", ckpt, "--prompt", "A", contains="has 9 ids")


def test_a_tokenizer_file_that_makes_the_rust_code_panic_is_refused(ckpt, capsys):
    bad = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": [["a", "b"]]}}
    (ckpt / "tokenizer.json").write_text(json.dumps(bad))
    one_line_error(capsys, "generate", "--checkpoint", ckpt, "--prompt", "ab", contains="malformed")


@pytest.mark.parametrize("tamper", [
    lambda s: {**s, "optimizer": None},
    lambda s: {**s, "step": "3"},
    lambda s: {k: v for k, v in s.items() if k != "rng"},
    lambda s: {**s, "rng": {"numpy": [1, 2], "python": []}},
    lambda s: [s],
])
def test_a_malformed_trainer_state_is_a_usage_error(tmp_path, tamper):
    from build_llm.store.checkpoint import trainer_files

    model = GPTModel(TINY)
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"step": 1, "elapsed_s": 0.5, "train_config": {}, "data": {"data_sha256": "a", "tokenizer_sha256": "b"}}
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    ckpt = save_checkpoint(tmp_path / "c", model, ABC_TOKENIZER,
                           trainer_files(get_optimizer_state_dict(model, optimizer), state))
    assert load_trainer_state(ckpt).state["step"] == 1
    saved = json.loads((ckpt / "trainer_state.json").read_text())
    (ckpt / "trainer_state.json").write_text(json.dumps(tamper(saved)))
    with pytest.raises(UsageError, match="malformed"):
        load_trainer_state(ckpt)


# --- flags and paths ----------------------------------------------------------------------------
def test_device_xpu_is_refused(ckpt, capsys):
    one_line_error(capsys, "generate", "--checkpoint", ckpt, "--prompt", "A", "--device", "xpu",
                   contains="device='xpu' is not supported")


def test_tokenizer_train_with_an_absurd_vocabulary_is_refused(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello world\n" * 20)
    one_line_error(capsys, "tokenizer", "train", "--data", tmp_path / "t.txt", "--vocab-size", str(2**40),
                   "--out", tmp_path / "tok.json", contains="1,048,576")
    assert not (tmp_path / "tok.json").exists()


def test_bench_checks_its_text_before_the_bench(tmp_path, capsys):
    binary = tmp_path / "ls"
    binary.write_bytes(b"\x7fELF\x00\x01" * 100)
    one_line_error(capsys, "bench", "--quick", "--text", binary, contains="looks binary")


def test_data_that_is_a_device_or_binary_late_in_the_file(tmp_path, capsys):
    one_line_error(capsys, "tokenizer", "stats", "--data", "/dev/zero", contains="not a regular file or a folder")
    late = tmp_path / "late.txt"
    late.write_bytes(b"text\n" * 4000 + b"\x00binary")
    one_line_error(capsys, "tokenizer", "stats", "--data", late, contains="looks binary")


def test_an_output_under_a_file_says_so(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, "surprisal", "--preset", "r-abc", "--max-tokens", "20", "--out",
                   tmp_path / "file" / "x.html", contains="is a file, not a folder")
    assert (tmp_path / "file").read_text() == "x"


def test_a_disk_full_save_keeps_the_old_checkpoint_and_says_so(tmp_path):
    # A real write failure: the child may not write files over 64 KiB (RLIMIT_FSIZE, EFBIG), as a full disk would.
    model = GPTModel(TINY)
    save_checkpoint(tmp_path / "c", model, ABC_TOKENIZER)
    before = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "from build_llm import GPTConfig, GPTModel, save_checkpoint\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
            "from build_llm.cli import main\n"
            "save_checkpoint(sys.argv[1], GPTModel(GPTConfig(vocab_size=5, context_length=8, emb_dim=128, "
            "n_heads=2, n_layers=2)))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "the previous one there is kept unchanged" in proc.stderr.strip().splitlines()[-1]
    assert {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


@pytest.fixture
def gpt2_ckpt(tmp_path) -> Path:
    from build_llm import get_tokenizer

    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("gpt2-small", n_layers=1, emb_dim=16, n_heads=2, context_length=32))
    return save_checkpoint(tmp_path / "g", model, get_tokenizer("gpt2"))


def test_inspect_draws_dollar_signs_as_text(gpt2_ckpt, tmp_path, capsys):
    for prompt in ("$x^2$", "a $^$"):  # mathtext: rendered as x², and a failure half-way before
        out = tmp_path / f"i{len(prompt)}"
        assert main(["inspect", "--checkpoint", str(gpt2_ckpt), "--prompt", prompt, "--out", str(out)]) == 0
        assert "".join(json.loads((out / "inspect.json").read_text())["tokens"]) == prompt
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    capsys.readouterr()


def test_inspect_failing_half_way_leaves_no_partial_out(gpt2_ckpt, tmp_path, monkeypatch, capsys):
    import build_llm.inspect.plots as probe

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(probe, "plot_layer_stats", fail)  # the fourth of five files
    one_line_error(capsys, "inspect", "--checkpoint", gpt2_ckpt, "--prompt", "hello", "--out", tmp_path / "i",
                   contains="No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]


def test_surprisal_html_makes_bidi_controls_visible(gpt2_ckpt, tmp_path, capsys):
    out = tmp_path / "s.html"
    assert main(["surprisal", "--checkpoint", str(gpt2_ckpt), "--text", "abc \u202eevil\u202c def",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    page = out.read_text()
    assert "\u202e" not in page and "⟨U+202E⟩" in page


# --- a bug is not a usage error -------------------------------------------------------------------
def test_a_bug_shows_its_traceback(monkeypatch, capsys):
    import build_llm.cli as cli

    def broken(args):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")  # a programming error

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["info"].set_defaults(run=broken)
    with pytest.raises(TypeError):
        main(["info"])


def test_an_os_error_names_its_reason_and_path(tmp_path, capsys):
    if os.geteuid() == 0:  # root reads anything: make the failure another way
        target = tmp_path / "dir.txt"
        target.mkdir()
        line = one_line_error(capsys, "tokenizer", "stats", "--data", target / "missing" / "x")
        assert "does not exist" in line
        return
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    secret.chmod(0)
    one_line_error(capsys, "tokenizer", "stats", "--data", secret, contains="permission denied")


def test_serve_engine_and_int8_quantisation_refuse_bad_arguments_as_usage_errors():
    """Library calls a user can get wrong raise the typed usage error (the CLI prints it as one line)."""
    import torch

    from build_llm import GPTConfig, GPTModel
    from build_llm.errors import UsageError
    from build_llm.infer.quant import quantize_int8
    from build_llm.serve.engine import Engine

    with pytest.raises(UsageError, match="2-D"):
        quantize_int8(torch.ones(4))
    model = GPTModel(GPTConfig(vocab_size=8, context_length=4, emb_dim=8, n_heads=2, n_layers=1)).eval()
    with pytest.raises(UsageError, match="max_batch=0"):
        Engine(model, max_batch=0)


def _without_permission_override() -> None:
    """In a root child before exec: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the capability
    bounding set, so the program it runs is root but obeys file permissions as any user does."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_permission_denied_is_reported_as_such_naming_the_path(tmp_path):
    """EACCES is "permission denied" with the path, not "no such file". Root reads every file, so as
    root the command runs in a child without the capabilities that override file permissions."""
    import os
    import subprocess
    import sys

    secret = tmp_path / "secret.txt"
    secret.write_text("some text to read " * 50, encoding="utf-8")
    secret.chmod(0)
    try:
        drop = _without_permission_override if os.geteuid() == 0 else None
        code = "import sys; from build_llm.cli import main; sys.exit(main(sys.argv[1:]))"
        try:
            proc = subprocess.run([sys.executable, "-c", code, "tokenizer", "stats", "--data", str(secret)],
                                  capture_output=True, text=True, cwd=tmp_path, preexec_fn=drop, timeout=300)
        except subprocess.SubprocessError as e:  # the capability could not be dropped (e.g. a container without it)
            pytest.skip(f"cannot run a child that obeys file permissions here: {e}")
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "permission denied" in lines[0].lower() and str(secret) in lines[0], lines
    finally:
        secret.chmod(0o600)


# --- issue 20: text that is not Unicode, byte-order marks, non-finite adapters and outputs -----------
@pytest.fixture(scope="module")
def bpe_runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny BPE base checkpoint, a one-step classification fine-tune and a one-step LoRA instruct run."""
    from tiny import tiny_cfg, words_tokenizer, write_classification_csv, write_instruct_json

    d = tmp_path_factory.mktemp("bpe")
    tok = words_tokenizer()
    torch.manual_seed(0)
    save_checkpoint(d / "base", GPTModel(tiny_cfg(tok.vocab_size)), tok)
    write_classification_csv(d / "train.csv")
    write_instruct_json(d / "train.json", 24)
    for argv in (["finetune", "classify", "--data", d / "train.csv", "--out", d / "cls"],
                 ["finetune", "instruct", "--data", d / "train.json", "--out", d / "lora", "--lora-rank", 4,
                  "--lora-alpha", 8]):
        assert main([str(a) for a in [*argv, "--init-from", d / "base", "--steps", 1]]) == 0
    return {"dir": d, "base": d / "base", "cls": d / "cls", "lora": d / "lora"}


# command-line arguments with bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape)
NOT_UTF8 = os.fsdecode(b"hi \xed\xa0\x80 there")


@pytest.mark.parametrize("verb", ["chat-prompt", "chat-system", "generate", "classify", "inspect", "surprisal"])
def test_text_that_is_not_unicode_is_one_error_line(bpe_runs, verb, tmp_path, capsys):
    argv = {"chat-prompt": ["chat", "--checkpoint", bpe_runs["lora"], "--prompt", NOT_UTF8],
            "chat-system": ["chat", "--checkpoint", bpe_runs["lora"], "--prompt", "hi", "--system", os.fsdecode(b"\xff")],
            "generate": ["generate", "--checkpoint", bpe_runs["base"], "--prompt", NOT_UTF8],
            "classify": ["classify", "--checkpoint", bpe_runs["cls"], "--text", NOT_UTF8],
            "inspect": ["inspect", "--checkpoint", bpe_runs["base"], "--prompt", NOT_UTF8, "--out", tmp_path / "o"],
            "surprisal": ["surprisal", "--checkpoint", bpe_runs["base"], "--text", NOT_UTF8, "--out", tmp_path / "o"]}
    line = one_line_error(capsys, *argv[verb], contains="not valid Unicode")
    assert "UTF-8" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stdin_errors", ["surrogateescape", "strict"])  # C.UTF-8's and most locales' stdin
def test_a_line_that_is_not_utf8_in_interactive_chat_is_one_note_and_the_session_goes_on(bpe_runs, stdin_errors):
    code = "import sys; from build_llm.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "chat", "--checkpoint", str(bpe_runs["lora"]),
                           "--max-new-tokens", "2"], input=b"hi \xff there\nred\n/quit\n", capture_output=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1",
                                            "PYTHONIOENCODING": f"utf-8:{stdin_errors}"})
    out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "not valid Unicode" in out + err
    assert (out + err).count("you>") >= 3  # the next line was answered


def test_instruct_data_with_a_lone_surrogate_names_the_record(bpe_runs, tmp_path, capsys):
    records = json.loads((bpe_runs["dir"] / "train.json").read_text())
    records[3]["input"] = "red \ud800 blue"
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(records))  # JSON's "\ud800" escape: valid JSON, not valid Unicode
    one_line_error(capsys, "finetune", "instruct", "--init-from", bpe_runs["base"], "--data", data,
                   "--out", tmp_path / "run", "--steps", 1, contains="record 4")


@pytest.mark.parametrize("name", ["train.csv", "train.json"])
def test_a_data_file_with_a_byte_order_mark_is_read(bpe_runs, name, tmp_path, capsys):
    data = tmp_path / name  # Excel's "CSV UTF-8" and Notepad's UTF-8 start with EF BB BF
    data.write_bytes(b"\xef\xbb\xbf" + (bpe_runs["dir"] / name).read_bytes())
    task = "classify" if name.endswith(".csv") else "instruct"
    code = main(["finetune", task, "--init-from", str(bpe_runs["base"]), "--data", str(data), "--out",
                 str(tmp_path / "run"), "--steps", "1"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()


def _tamper_adapter(lora: Path, out: Path, how: str) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(lora, out)
    ckpt = out / "checkpoint"
    tensors = load_file(ckpt / "adapter.safetensors")
    name = next(n for n in tensors if n.endswith("lora.A"))
    if how == "nan":
        tensors[name][0, 0] = math.nan
    elif how in ("int8", "bool", "complex64"):
        tensors[name] = tensors[name].to(getattr(torch, how))
    else:
        meta = json.loads((ckpt / "adapter.json").read_text())
        meta["scaling"] = {"scaling-inf": math.inf, "scaling-nan": math.nan, "scaling-huge": 1e308}[how]
        (ckpt / "adapter.json").write_text(json.dumps(meta))
    save_file(tensors, ckpt / "adapter.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("how, says", [("nan", "NaN"), ("int8", "int8"), ("bool", "bool"), ("complex64", "complex64"),
                                       ("scaling-inf", "scaling=inf"), ("scaling-nan", "scaling=nan"),
                                       ("scaling-huge", "NaN or infinity")])
def test_merge_lora_refuses_an_adapter_that_is_not_finite_floats(bpe_runs, how, says, tmp_path, capsys):
    run = _tamper_adapter(bpe_runs["lora"], tmp_path / "run", how)
    one_line_error(capsys, "merge-lora", "--checkpoint", run, "--out", tmp_path / "merged", contains=says)
    assert not (tmp_path / "merged").exists()


def test_classify_with_nan_weights_is_one_error_line_not_invalid_json(bpe_runs, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    run = tmp_path / "cls"
    shutil.copytree(bpe_runs["cls"], run)
    weights = run / "checkpoint" / "model.safetensors"
    state = load_file(weights)
    state["out_head.weight"].fill_(math.nan)
    save_file(state, weights, metadata={"format": "pt"})
    code = main(["classify", "--checkpoint", str(run), "--text", "the cat is cat"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured.out
    assert len(captured.err.strip().splitlines()) == 1 and "NaN" in captured.err


def test_a_temperature_that_is_zero_in_float32_is_refused_as_too_small(ckpt, capsys):
    # Half float32's smallest positive value rounds to 0 (ties to even); the next float above rounds up to it.
    smallest_zero = torch.finfo(torch.float32).smallest_normal * torch.finfo(torch.float32).eps / 2
    assert torch.tensor(smallest_zero).item() == 0 < torch.tensor(math.nextafter(smallest_zero, 1)).item()
    line = one_line_error(capsys, "generate", "--checkpoint", ckpt, "--prompt", "A", "--temperature", "1e-46",
                          contains="too small")
    assert "infinity" not in line and f"{smallest_zero:.3g}" in line
    argv = ["generate", "--checkpoint", str(ckpt), "--prompt", "AB", "--max-new-tokens", "4"]
    assert main(argv + ["--temperature", repr(math.nextafter(smallest_zero, 1))]) == 0
    capsys.readouterr()


def test_serve_takes_its_api_key_from_the_environment_which_ps_does_not_show(ckpt, monkeypatch, capsys):
    import build_llm.cli.serve as serve_cli

    started = []
    monkeypatch.setattr(serve_cli, "run_server", lambda model, tokenizer, settings, **kw: started.append(settings))
    monkeypatch.setenv("BUILD_LLM_API_KEY", "sk-from-env")
    assert main(["serve", "--checkpoint", str(ckpt)]) == 0 and started[-1].api_key == "sk-from-env"
    assert main(["serve", "--checkpoint", str(ckpt), "--api-key", "sk-flag"]) == 0 and started[-1].api_key == "sk-flag"
    monkeypatch.setenv("BUILD_LLM_API_KEY", "")  # set but empty: refused, not a server open to all
    one_line_error(capsys, "serve", "--checkpoint", ckpt, contains="$BUILD_LLM_API_KEY is empty")
    monkeypatch.setenv("BUILD_LLM_API_KEY", "sk 1\r")
    one_line_error(capsys, "serve", "--checkpoint", ckpt, contains="$BUILD_LLM_API_KEY holds")
    monkeypatch.delenv("BUILD_LLM_API_KEY")
    assert main(["serve", "--checkpoint", str(ckpt)]) == 0 and started[-1].api_key is None
    assert len(started) == 3


@pytest.mark.parametrize("key", ["sk-1\n", "sk 1\r", "\tsk1", "sk1 ", os.fsdecode(b"sk\xff1"), "clé"])
def test_serve_refuses_an_api_key_no_header_can_carry(ckpt, key, monkeypatch, capsys):
    import build_llm.cli.serve as serve_cli

    started = []
    monkeypatch.setattr(serve_cli, "run_server", lambda *a, **kw: started.append(a))  # never listen in a test
    one_line_error(capsys, "serve", "--checkpoint", ckpt, "--api-key", key, contains="--api-key")
    assert not started


# --- a newcomer's path: a fine-tune given where a whole language model is needed --------------------
@pytest.mark.parametrize("kind, says", [("lora", "is a LoRA run: it holds an adapter, not a whole model"),
                                        ("cls", "is a classification fine-tune")])
@pytest.mark.parametrize("verb", ["train", "finetune"])
def test_a_fine_tune_that_is_no_whole_model_is_named_as_such(bpe_runs, kind, says, verb, tmp_path, capsys):
    # They read "no checkpoint in ..." (LoRA) and "weights do not match config.json" (a classifier).
    run = bpe_runs[kind]
    argv = {"train": ["train", "--data", bpe_runs["dir"] / "train.csv", "--init-from", run, "--steps", 1],
            "finetune": ["finetune", "instruct", "--data", bpe_runs["dir"] / "train.json", "--init-from", run]}[verb]
    line = one_line_error(capsys, *argv, "--out", tmp_path / "new", contains=says)
    assert ("merge-lora" if kind == "lora" else "build-llm classify") in line
    assert not (tmp_path / "new" / "checkpoint").exists()


def test_eval_of_a_classifier_says_it_is_no_language_model_not_that_it_writes_one(bpe_runs, capsys):
    line = one_line_error(capsys, "eval", "--checkpoint", bpe_runs["cls"], "--data", bpe_runs["dir"] / "train.csv",
                          contains="is a classification fine-tune")
    assert "to write" not in line and "build-llm classify" in line


def test_an_empty_csv_is_called_empty_not_missing_a_column(bpe_runs, tmp_path, capsys):
    (tmp_path / "empty.csv").write_text("")  # it said "--text-column 'text' is not a column ...; its columns are []"
    one_line_error(capsys, "finetune", "classify", "--init-from", bpe_runs["base"], "--data", tmp_path / "empty.csv",
                   "--out", tmp_path / "run", contains="is empty; expected a CSV file with a header row")
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_classify_with_an_instruction_fine_tune_is_an_error_line_like_the_others(bpe_runs, capsys):
    line = one_line_error(capsys, "classify", "--checkpoint", bpe_runs["lora"], "--text", "the cat",
                          contains="is an instruction fine-tune")
    assert line.startswith("build-llm: error: --checkpoint")  # it lacked "error:"


def test_finetune_resume_on_a_pretraining_run_names_out_not_checkpoint(tmp_path, capsys):
    from tiny import write_instruct_json

    run = tmp_path / "pretrained"
    write_instruct_json(tmp_path / "text.json", 40)  # a text to pretrain on, and instructions to fine-tune on
    assert main(["train", "--data", str(tmp_path / "text.json"), "--tokenizer", "char", "--out", str(run), "--steps", "1", "--context-length", "8", "--emb-dim", "8",
                 "--n-layers", "1", "--n-heads", "2", "--eval-batches", "1", "--batch-size", "2"]) == 0
    capsys.readouterr()
    line = one_line_error(capsys, "finetune", "instruct", "--init-from", run, "--data", tmp_path / "text.json",
                          "--out", run, "--resume", contains="--resume: --out")
    assert "holds no fine-tuning run" in line and "--checkpoint" not in line


def test_info_and_doctor_take_a_lora_run_as_every_checkpoint_verb_does(bpe_runs, capsys):
    # docs/fine-tuning.md: "every --checkpoint verb takes the LoRA run"; both said "no checkpoint in".
    assert main(["info", "--checkpoint", str(bpe_runs["lora"])]) == 0
    table = capsys.readouterr().out
    assert ".lora.A " in table and "Total parameters:" in table
    assert main(["info", "--checkpoint", str(bpe_runs["cls"])]) == 0  # a classifier's table: its head of 3 labels
    assert "out_head.bias" in capsys.readouterr().out
    lines = {}
    for kind in ("base", "lora"):
        main(["doctor", "--checkpoint", str(bpe_runs[kind]), "--steps", "2"])
        lines[kind] = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("PASS  gradients"))
    # the merged run's doctor trains every weight, as the base's does (the adapter's frozen base weights did not)
    assert lines["lora"].split("(")[0] == lines["base"].split("(")[0]


@pytest.mark.parametrize("verb, extra, flag", [("chat", ["--prompt", "hi", "--temperature", "-1"], "--temperature=-1.0"),
                                               ("inspect", ["--prompt", "hi", "--top-p", "3"], "--top-p=3.0")])
def test_chat_and_inspect_name_the_sampling_flag_not_the_argument(bpe_runs, verb, extra, flag, tmp_path, capsys):
    # They said "temperature=-1.0" and "top_p=3.0 ... expected None or ...", the library's words.
    out = ["--out", tmp_path / "out"] if verb == "inspect" else []
    line = one_line_error(capsys, verb, "--checkpoint", bpe_runs["lora"], *extra, *out, contains=flag)
    assert line.startswith(f"build-llm: error: {flag} is invalid") and "None" not in line
