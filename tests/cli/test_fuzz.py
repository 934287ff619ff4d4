"""Fuzzing the command (hypothesis): every verb with generated bad flags, and the verbs that read a
checkpoint against tampered checkpoint files, of pretraining runs and of fine-tunes (full, LoRA,
merged). Each case must end in exit code 2 (or 0/1 where the
tampering is harmless or the run diverges) with exactly one line on stderr, never a traceback, and
leave every file that existed before unchanged.

The default run tries a modest number of cases (FUZZ_EXAMPLES, each test); the slow-marked runs try
many more. The number tried is printed (pytest -s) and checked."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from build_llm import cli

FUZZ_EXAMPLES = int(os.environ.get("BUILD_LLM_FUZZ_EXAMPLES", "25"))
SLOW_EXAMPLES = 400


def fuzz(examples: int, derandomize: bool = False):
    """hypothesis settings of every fuzz test: no deadline (a case runs the real CLI), fixtures reused."""
    return settings(max_examples=examples, deadline=None, derandomize=derandomize,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


SKIP_VERBS = {"serve", "chat"}  # long-running servers and interactive loops: not a one-shot command
TRIED = {"flags": 0, "tampered": 0, "fine-tune": 0}  # cases run (hypothesis's shrinking included)
PASSED = {"flags": 0, "tampered": 0, "fine-tune": 0}  # of which every check held


@pytest.fixture(scope="module", autouse=True)
def report_how_many_cases_were_tried():
    """Printed with pytest -s at the end of the module; the issue's note quotes it."""
    yield
    if sum(TRIED.values()):
        print(f"\nfuzz: bad flags over {len(PARSERS)} verbs: {PASSED['flags']} of {TRIED['flags']} cases passed; "
              f"tampered files: {PASSED['tampered']} of {TRIED['tampered']} cases passed; "
              f"tampered fine-tune files: {PASSED['fine-tune']} of {TRIED['fine-tune']} cases passed")


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink() and p.name != ".build-llm.lock"}


def call(argv: list[str]) -> tuple[int, str]:
    """main() in this process; an exception escaping it (a traceback for the user) fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, err.getvalue()


def check_outcome(argv: list[str], code: int, err: str, allowed: tuple[int, ...]) -> None:
    assert code in allowed, (argv, code, err)
    if code == 1 and argv[0] == "doctor":  # doctor's exit 1 is its verdict: a check failed, reported on stdout
        assert err.strip() == "", (argv, err)
    elif code:
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("build-llm: note:")]
        assert len(lines) == 1, (argv, err)
        assert lines[0].startswith("build-llm"), (argv, err)
    assert "Traceback" not in err, (argv, err)


# --- the world the commands run in ---------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    text = root / "text.txt"
    text.write_text("a small text for a tiny model, with a few words.\n" * 40)
    code, err = call(["train", "--data", str(text), "--out", str(root / "run"), "--steps", "2", "--eval-every", "2",
                      "--eval-batches", "1", "--batch-size", "4", "--context-length", "8", "--emb-dim", "16",
                      "--n-layers", "1", "--n-heads", "2"])
    assert code == 0, err
    from build_llm import GPTConfig, GPTModel
    from build_llm.interop.hf import save_hf

    save_hf(GPTModel(GPTConfig(vocab_size=50257, context_length=8, emb_dim=8, n_heads=2, n_layers=1)), root / "hf")
    (root / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (root / "empty").mkdir()
    (root / "foreign").mkdir()
    (root / "foreign" / "notes.txt").write_text("the user's")
    (root / "a-file").write_text("a file")
    return root


def valid_required(world: Path, verb: str, action: argparse.Action, n: int) -> list[str]:
    """A good value for a required argument, so that the bad ones are what fails."""
    name = action.dest
    value = {"checkpoint": str(world / "run"), "init_from": str(world / "run"), "prompt": "a small",
             "data": str(world / "text.txt"), "dir": str(world / "hf"), "vocab_size": "300", "text": "a small",
             "out": str(world / "outs" / f"{verb}-{n}")}.get(name)
    if value is None:
        raise AssertionError(f"fuzz: no good value for the required {name} of {verb}; add one")
    if name == "data" and action.nargs == "+":
        value = str(world / "text.txt")
    return [value] if not action.option_strings else [action.option_strings[-1], value]


def bad_values(world: Path, verb: str, action: argparse.Action) -> list[str]:
    """Values this option must refuse (each alone is enough to make the command fail)."""
    if action.choices is not None:
        return ["bogus", ""]
    kind = getattr(action.type, "__name__", str(action.type))
    if action.type is float:
        return ["nan", "x", "-inf", ""]
    if kind == "parse" or action.type is int:  # the integer types
        return ["-1", "x", "1.5", ""]
    if kind == "_temperatures":
        return ["x", "1,2,3", "-1"]
    if kind == "comma_list":  # a tuple setting: betas (two numbers in [0, 1)), lora targets
        return ["x", "", "1,2,3", "-1", "attn,bogus"]
    name = action.dest
    if name == "time_budget":
        return ["x", "0s", "-5m", "5 parsecs"]
    if name == "text" and verb != "bench":  # a text to score or classify, not a path: any text is good
        return []
    if name == "out" or name == "png":
        return [str(world / "a-file" / "x.png"), str(world / "foreign")] + (["x.jpg"] if name == "png" else [])
    if name in ("data", "val_data"):  # a folder of text files is data: only an empty one is wrong
        return [str(world / "missing"), "/dev/zero", str(world / "empty"), str(world / "binary.bin")]
    if name == "text":  # bench's text: a folder of text files is good text (and would run the whole bench)
        return [str(world / "missing"), "/dev/zero", str(world / "binary.bin")]
    if name in ("checkpoint", "dir", "tokenizer", "init_from"):
        return [str(world / "missing"), "/dev/zero", str(world / "foreign"), str(world / "binary.bin")]
    if name == "device":
        return ["xpu", "cuda:9", "bogus"]
    if name == "prompt":
        return [""]
    return []


def verb_parsers() -> dict[str, argparse.ArgumentParser]:
    parsers = {}
    for action in cli.build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, parser in action.choices.items():
                if name in SKIP_VERBS:
                    continue
                subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
                if subs:  # a verb with verbs (tokenizer train|stats)
                    for sub_name, sub_parser in subs[0].choices.items():
                        parsers[f"{name} {sub_name}"] = sub_parser
                else:
                    parsers[name] = parser
    return parsers


PARSERS = verb_parsers()


def flag_cases(world: Path):
    """(verb, argv) with one to three bad options and good values for the other required ones."""
    def build(verb: str, draw) -> list[str]:
        parser = PARSERS[verb]
        actions = [a for a in parser._actions if a.dest not in ("help", "version")]
        candidates = [a for a in actions if bad_values(world, verb, a)]
        chosen = draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=3, unique_by=lambda a: a.dest))
        argv = verb.split()
        n = draw(st.integers(0, 10**6))
        for a in actions:
            if a in chosen:
                value = draw(st.sampled_from(bad_values(world, verb, a)))
                argv += [a.option_strings[-1], value] if a.option_strings else [value]
            elif a.required or (not a.option_strings and a.nargs not in ("?", "*")):
                argv += valid_required(world, verb, a, n)
        return argv

    return st.sampled_from(sorted(PARSERS)).flatmap(lambda verb: st.composite(lambda draw: build(verb, draw))())


def run_flag_case(world: Path, argv: list[str]) -> None:
    before = snapshot(world)
    code, err = call(argv)
    TRIED["flags"] += 1
    check_outcome(argv, code, err, (2,))
    after = snapshot(world)
    assert {k: after.get(k) for k in before} == before, argv  # nothing that existed was changed or removed
    PASSED["flags"] += 1


@fuzz(FUZZ_EXAMPLES, derandomize=True)
@given(data=st.data())
def test_every_verb_refuses_bad_flags_in_one_line(world, data):
    run_flag_case(world, data.draw(flag_cases(world)))


# --- tampered checkpoints ------------------------------------------------------------------------
TAMPERS = {
    "truncate": lambda b, i: b[: i % max(len(b), 1)],
    "empty": lambda b, i: b"",
    "flip a byte": lambda b, i: b[: i % len(b)] + bytes([b[i % len(b)] ^ 0xFF]) + b[i % len(b) + 1:] if b else b"x",
    "deep json": lambda b, i: b"[" * 50_000 + b"]" * 50_000,
    "json of another shape": lambda b, i: [b"[]", b"{}", b'{"a": null}', b"null", b'"text"', b"1e999"][i % 6],
    "binary": lambda b, i: bytes(range(256)) * (1 + i % 4),
}
READERS = [
    ["info", "--checkpoint", "{ckpt}"],
    ["generate", "--checkpoint", "{ckpt}", "--prompt", "a small", "--max-new-tokens", "3"],
    ["generate", "--checkpoint", "{ckpt}", "--prompt", "a small", "--max-new-tokens", "3", "--temperature", "1"],
    ["eval", "--checkpoint", "{ckpt}", "--data", "{text}"],
    ["inspect", "--checkpoint", "{ckpt}", "--prompt", "a small", "--out", "{out}"],
    ["surprisal", "--checkpoint", "{ckpt}", "--text", "a small text", "--out", "{out}.html"],
    ["export-hf", "--checkpoint", "{ckpt}", "--out", "{out}"],
    ["train", "--data", "{text}", "--out", "{ckpt}", "--resume", "--steps", "3"],
    ["doctor", "--checkpoint", "{ckpt}", "--steps", "2"],
    ["train", "--data", "{text}", "--out", "{out}", "--init-from", "{ckpt}", "--steps", "1", "--batch-size", "2"],
]


def copy_run(src: Path, dst: Path) -> None:
    """A copy of a run directory that is ours as the original is: each marker is tied to its folder's
    inode, so each is rewritten for the copy's folder (what the tool would have written there)."""
    from build_llm.store.fsio import MARKER

    shutil.copytree(src, dst)
    for marker in dst.rglob(MARKER):
        data = json.loads(marker.read_text())
        data["inode"] = marker.parent.stat().st_ino
        marker.write_text(json.dumps(data) + "\n")


@fuzz(FUZZ_EXAMPLES, derandomize=True)
@given(file=st.sampled_from(["checkpoint/model.safetensors", "checkpoint/config.json", "checkpoint/tokenizer.json",
                             "checkpoint/trainer_state.json", "checkpoint/optimizer.safetensors",
                             "checkpoint/rng.safetensors", "data/meta.json", "data/tokens.bin", "metrics.jsonl"]),
       tamper=st.sampled_from(sorted(TAMPERS)), where=st.integers(0, 10**6), reader=st.sampled_from(READERS))
def test_tampered_checkpoints_are_one_error_line(world, tmp_path_factory, file, tamper, where, reader):
    base = tmp_path_factory.mktemp("tampered")
    run_dir = base / "run"
    copy_run(world / "run", run_dir)
    target = run_dir / file
    target.write_bytes(TAMPERS[tamper](target.read_bytes(), where))
    argv = [a.format(ckpt=run_dir, text=world / "text.txt", out=base / "out") for a in reader]
    before = snapshot(base)
    code, err = call(argv)
    TRIED["tampered"] += 1
    check_outcome(argv, code, err, (0, 1, 2))
    if code or reader[0] != "train":  # a resumed run that worked has moved on; anything else changes nothing
        after = snapshot(base)
        assert {k: after.get(k) for k in before} == before, (argv, file, tamper)
    PASSED["tampered"] += 1


@pytest.mark.slow
@fuzz(SLOW_EXAMPLES)
@given(data=st.data())
def test_every_verb_refuses_bad_flags_many_cases(world, data):
    run_flag_case(world, data.draw(flag_cases(world)))


# --- tampered fine-tune checkpoints --------------------------------------------------------------
# The files a fine-tune writes (full or LoRA, classify or instruct, and a merge-lora output), read by
# the verbs that take them: classify, chat, serve (its model loading: the server itself is stubbed),
# merge-lora and finetune --resume.
FT_FILES = {
    "cls": ["finetune.json", "model.safetensors", "config.json", "tokenizer.json", "trainer_state.json",
            "optimizer.safetensors", "rng.safetensors"],
    "ins": ["finetune.json", "model.safetensors", "config.json", "tokenizer.json", "trainer_state.json",
            "optimizer.safetensors", "rng.safetensors"],
    "cls-lora": ["finetune.json", "adapter.json", "adapter.safetensors", "config.json", "tokenizer.json",
                 "trainer_state.json", "optimizer.safetensors", "rng.safetensors"],
    "ins-lora": ["finetune.json", "adapter.json", "adapter.safetensors", "config.json", "tokenizer.json",
                 "trainer_state.json", "optimizer.safetensors", "rng.safetensors"],
    "merged": ["finetune.json", "model.safetensors", "config.json", "tokenizer.json"],
}
CLASSIFY = ["classify", "--checkpoint", "{ckpt}", "--text", "the fox is a fox"]
CHAT = ["chat", "--checkpoint", "{ckpt}", "--prompt", "what is the word", "--max-new-tokens", "2"]
SERVE = ["serve", "--checkpoint", "{ckpt}"]
MERGE = ["merge-lora", "--checkpoint", "{ckpt}", "--out", "{out}"]
RESUME = {task: ["finetune", task, "--init-from", "{base}", "--data", data, "--out", "{ckpt}", "--resume", "--steps", "2"]
          for task, data in (("classify", "{csv}"), ("instruct", "{json}"))}
FT_READERS = {
    "cls": [CLASSIFY, SERVE, RESUME["classify"]],
    "cls-lora": [CLASSIFY, MERGE, RESUME["classify"]],
    "ins": [CHAT, SERVE, RESUME["instruct"]],
    "ins-lora": [CHAT, SERVE, MERGE, RESUME["instruct"]],
    "merged": [CHAT, SERVE],
}
HOSTILE = [None, [], {}, "x", "", -1, 0, 1.5, 2**40, True, [[["deep"]]], {"a": {"b": None}}, ["x"] * 5]


def tamper_field(b: bytes, i: int) -> bytes:
    """A JSON object with one field (at the top or one object down) set to a hostile value, dropped,
    or joined by an unknown key: what the byte-level tampers rarely reach."""
    try:
        data = json.loads(b)
    except ValueError:
        return TAMPERS["flip a byte"](b, i)
    if not isinstance(data, dict) or not data:
        return b"[]"
    target, key = data, sorted(data)[i % len(data)]
    if isinstance(data[key], dict) and data[key] and (i // 7) % 2:
        target = data[key]
        key = sorted(target)[(i // 14) % len(target)]
    choice = (i // 3) % (len(HOSTILE) + 2)
    if choice == len(HOSTILE):
        del target[key]
    elif choice == len(HOSTILE) + 1:
        target["bogus"] = 1
    else:
        target[key] = HOSTILE[choice]
    return json.dumps(data).encode()


FT_TAMPERS = {**TAMPERS, "json field": tamper_field}


@pytest.fixture(scope="module")
def ft_world(tmp_path_factory, tokenizer):
    """A tiny base checkpoint with a BPE tokenizer, its fine-tunes (one step each) and a merge."""
    import torch

    from build_llm import GPTModel
    from build_llm.store.checkpoint import save_checkpoint
    from tiny import TINY, write_classification_csv, write_instruct_json

    root = tmp_path_factory.mktemp("ft-fuzz")
    torch.manual_seed(0)
    save_checkpoint(root / "base", GPTModel(TINY.replace(vocab_size=tokenizer.vocab_size, context_length=128)),
                    tokenizer)
    write_classification_csv(root / "train.csv", 4)
    write_instruct_json(root / "train.json", 12)
    lora = ["--lora-rank", "2", "--lora-alpha", "4"]
    for name, task, data, extra in (("cls", "classify", "train.csv", []), ("cls-lora", "classify", "train.csv", lora),
                                    ("ins", "instruct", "train.json", []), ("ins-lora", "instruct", "train.json", lora)):
        code, err = call(["finetune", task, "--init-from", str(root / "base"), "--data", str(root / data),
                          "--out", str(root / name), "--steps", "1", "--batch-size", "4", *extra])
        assert code == 0, err
    code, err = call(["merge-lora", "--checkpoint", str(root / "ins-lora"), "--out", str(root / "merged")])
    assert code == 0, err
    return root


def ft_case(ft_world: Path, base: Path, run: str, file: str, tamper: Callable[[bytes], bytes],
            reader: list[str]) -> tuple[list[str], int, str]:
    """Copy the run `run`, tamper its `file` (in its checkpoint/), run `reader` on the copy; check that
    the outcome is clean and that only a resumed run that worked changed any file."""
    run_dir = base / run
    copy_run(ft_world / run, run_dir)
    target = run_dir / file if run == "merged" else run_dir / "checkpoint" / file
    target.write_bytes(tamper(target.read_bytes()))
    argv = [a.format(ckpt=run_dir, out=base / "out", base=ft_world / "base", csv=ft_world / "train.csv",
                     json=ft_world / "train.json") for a in reader]
    before, world_before = snapshot(base), snapshot(ft_world)
    with mock.patch("build_llm.cli.serve.run_server"):  # serve: the model loading, not the server
        code, err = call(argv)
    check_outcome(argv, code, err, (0, 1, 2))
    if code or reader[0] != "finetune":  # a resumed run that worked has moved on; anything else changes nothing
        after = snapshot(base)
        assert {k: after.get(k) for k in before} == before, (argv, file)
    assert snapshot(ft_world) == world_before, (argv, file)  # the base and the original runs above all
    return argv, code, err


def edit_json(**changes: Any) -> Callable[[bytes], bytes]:
    """A tamper setting keys of a JSON object (a value of DROP removes the key; a dotted key reaches
    into an object)."""
    def tamper(b: bytes) -> bytes:
        data = json.loads(b)
        for key, value in changes.items():
            *outer, last = key.split(".")
            target = data
            for k in outer:
                target = target[k]
            if value is DROP:
                del target[last]
            else:
                target[last] = value
        return json.dumps(data).encode()
    return tamper


DROP = object()
NAMED_TAMPERS = [  # issue 20, item 14: each is one line naming the file, exit 2
    ("cls", "finetune.json", lambda b: b"[]", CLASSIFY, "finetune.json"),
    ("cls", "finetune.json", edit_json(task=DROP), CLASSIFY, "task"),
    ("cls", "finetune.json", edit_json(task="summarize"), CLASSIFY, "task"),
    ("cls-lora", "finetune.json", edit_json(base={}), CLASSIFY, "base"),
    ("ins-lora", "finetune.json", edit_json(base="x"), CHAT, "base"),
    ("ins-lora", "finetune.json", edit_json(base="x"), RESUME["instruct"], "base"),
    ("cls", "finetune.json", lambda b: b"[" * 50_000 + b"]" * 50_000, CLASSIFY, "finetune.json"),
    ("cls", "finetune.json", edit_json(labels=DROP), CLASSIFY, "labels"),
    ("cls-lora", "finetune.json", edit_json(labels=None), CLASSIFY, "labels"),
    ("cls", "finetune.json", edit_json(labels=[1, 2, 3]), CLASSIFY, "labels"),
    ("cls", "finetune.json", edit_json(labels=["a", "b", "c", "d"]), CLASSIFY, "labels"),
    ("cls-lora", "finetune.json", edit_json(labels=["a", "b", "c", "d"]), CLASSIFY, "labels"),
    ("cls", "finetune.json", edit_json(max_length="x"), CLASSIFY, "max_length"),
    ("cls", "finetune.json", edit_json(max_length=-1), CLASSIFY, "max_length"),
    ("ins-lora", "finetune.json", edit_json(lora="x"), CHAT, "lora"),
    ("ins-lora", "adapter.json", lambda b: b'"x"', CHAT, "adapter.json"),
    ("ins-lora", "adapter.json", lambda b: b"x", CHAT, "adapter.json"),
    ("ins-lora", "adapter.json", lambda b: b"[" * 50_000 + b"]" * 50_000, CHAT, "adapter.json"),
    ("ins-lora", "adapter.json", lambda b: b'{"a": ' + b + b"}", CHAT, "adapter.json"),
    ("ins-lora", "adapter.json", edit_json(scaling="x"), CHAT, "scaling"),
    ("ins-lora", "adapter.json", edit_json(scaling="x"), RESUME["instruct"], "scaling"),
    ("ins-lora", "adapter.json", edit_json(scaling=float("nan")), MERGE, "scaling"),
    ("ins-lora", "adapter.json", edit_json(rank=2**40), CHAT, "rank"),
    ("ins-lora", "adapter.json", edit_json(rank=2**40), RESUME["instruct"], "rank"),
    ("ins-lora", "adapter.json", edit_json(rank=3), MERGE, "rank"),
    ("ins-lora", "adapter.json", edit_json(targets="attn"), CHAT, "targets"),
    ("cls", "config.json", edit_json(n_layers=2), CLASSIFY, "config.json"),
    ("ins", "config.json", edit_json(n_layers=2), SERVE, "config.json"),
    ("cls-lora", "config.json", edit_json(n_layers=2), CLASSIFY, "config.json"),
    ("cls", "trainer_state.json", edit_json(**{"finetune_config.bogus": 1}), RESUME["classify"], "bogus"),
    ("cls", "trainer_state.json", edit_json(**{"finetune_config.task": DROP}), RESUME["classify"], "task"),
    ("ins-lora", "trainer_state.json", edit_json(**{"finetune_config.lora_rank": 3}), RESUME["instruct"],
     "trainer_state.json"),
]


@pytest.mark.parametrize("run, file, tamper, reader, named", NAMED_TAMPERS,
                         ids=[f"{r}-{f}-{i}" for i, (r, f, *_) in enumerate(NAMED_TAMPERS)])
def test_named_fine_tune_tampers_are_one_error_line(ft_world, tmp_path, run, file, tamper, reader, named):
    argv, code, err = ft_case(ft_world, tmp_path, run, file, tamper, reader)
    assert code == 2, (argv, err)
    assert named in err, (argv, err)


@fuzz(FUZZ_EXAMPLES, derandomize=True)
@given(data=st.data(), tamper=st.sampled_from(sorted(FT_TAMPERS)), where=st.integers(0, 10**6))
def test_tampered_fine_tune_files_are_one_error_line(ft_world, tmp_path_factory, data, tamper, where):
    run = data.draw(st.sampled_from(sorted(FT_FILES)), "run")
    file = data.draw(st.sampled_from(FT_FILES[run]), "file")
    reader = data.draw(st.sampled_from(FT_READERS[run]), "reader")
    TRIED["fine-tune"] += 1
    ft_case(ft_world, tmp_path_factory.mktemp("ft-tampered"), run, file, lambda b: FT_TAMPERS[tamper](b, where), reader)
    PASSED["fine-tune"] += 1
