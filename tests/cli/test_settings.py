"""Each setting written once: every field of the config dataclasses has exactly one flag on each verb
that takes it (or is marked internal), its --help shows the default, a field added to a dataclass
is a flag with no other edit, and what a resumed run may change is read from the fields."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

import build_llm.cli.train as cli_train
from build_llm.cli import build_parser, main
from build_llm.config import GPTConfig
from build_llm.settings import flag_of, internal, resumable, setting
from build_llm.train.config import ABC_TRAIN, BUDGET_TRAIN, FinetuneConfig, TrainConfig


def verb(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    """The parser of `build-llm NAME [SUBNAME]`."""
    for name in names:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


# (verb, config, fields that verb leaves out, what its help shows as the default: None = the dataclass's)
VERBS = [
    (("train",), GPTConfig, (), "the preset's"),  # the model flags override a preset's shape
    (("train",), TrainConfig, (), None),
    (("finetune", "classify"), FinetuneConfig, (), None),
    (("finetune", "instruct"), FinetuneConfig, ("trainable",), None),  # --trainable: classification only
]


def written(f: dataclasses.Field) -> str:
    """A field's default as a user writes it on the command line (None: what unset means)."""
    value = f.default
    if value is None:
        return f.metadata["unset"] or "none"
    if isinstance(value, bool):
        return flag_of(f) if value else "--no-" + flag_of(f)[2:]
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def squeeze(text: str) -> str:
    return "".join(text.split())  # --help wraps lines (also at hyphens)


@pytest.mark.parametrize("names, cls, left_out, default_text", VERBS, ids=lambda v: getattr(v, "__name__", None))
def test_every_field_has_one_flag_or_is_internal_and_help_shows_its_default(names, cls, left_out, default_text):
    parser = verb(build_parser(), *names)
    help_text = squeeze(parser.format_help())
    hidden = internal(cls)
    for f in dataclasses.fields(cls):
        actions = [a for a in parser._actions if a.dest == f.name]
        if f.name in hidden or f.name in left_out:
            assert actions == [] and flag_of(f) not in parser._option_string_actions, (names, f.name)
            continue
        assert len(actions) == 1, (names, f.name, actions)
        assert flag_of(f) in actions[0].option_strings, (names, f.name)
        if f.name == "device":
            want = "auto"  # every verb's --device defaults to auto
        else:
            want = default_text or written(f)
        assert f"(default: {want}" in actions[0].help, (names, f.name, actions[0].help)
        assert squeeze(actions[0].help % {}) in help_text, (names, f.name)


def test_internal_fields_are_the_model_fields_set_elsewhere():
    assert internal(GPTConfig) == {"vocab_size", "gelu", "fused_qkv", "padding_idx", "attn_out_dropout",
                                   "attn_impl", "init_std", "ln_eps", "rope_base",
                                   # today's open models' details: set by a preset or an import
                                   "head_size", "rope_scaling", "rope_factor", "rope_low_freq_factor",
                                   "rope_high_freq_factor", "rope_original_context", "layer_types", "rope_local_base",
                                   "attn_scale", "norm_plus_one", "scale_emb", "post_norms"}
    assert internal(TrainConfig) == set() and internal(FinetuneConfig) == {"task"}  # task: the subcommand


def test_train_help_shows_the_abc_and_time_budget_defaults_where_they_differ():
    lr = verb(build_parser(), "train")._option_string_actions["--lr"]
    assert lr.help.endswith(f"(default: {TrainConfig().lr}; ABC: {ABC_TRAIN.lr}; time budget: {BUDGET_TRAIN.lr})")


def test_model_and_train_flags_do_not_share_a_name():
    model = {f.name for f in dataclasses.fields(GPTConfig)}
    assert not model & {f.name for f in dataclasses.fields(TrainConfig)}


def test_what_a_resumed_run_may_change():
    assert resumable(TrainConfig) == {"steps", "eval_every", "eval_batches", "device", "compile", "dtype", "fsdp"}
    assert resumable(FinetuneConfig) == {"epochs", "steps", "eval_every", "device"}


# --- a new field ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WithLabelSmoothing(TrainConfig):
    """TrainConfig with one field more, declared as any field is: nothing else is edited."""
    label_smoothing: float = setting(0.0, "share of the target probability spread over the vocabulary",
                                     at_least=0, below=1)


@pytest.fixture
def new_field(monkeypatch):
    """The train verb as it is when TrainConfig has the new field; run_training records what it is given."""
    monkeypatch.setattr(cli_train, "TrainConfig", WithLabelSmoothing)
    monkeypatch.setattr(cli_train, "TRAIN_VARIANTS", {name: WithLabelSmoothing.from_dict(cfg.to_dict())
                                                      for name, cfg in cli_train.TRAIN_VARIANTS.items()})
    calls = []
    monkeypatch.setattr(cli_train, "run_training", lambda out, **kw: calls.append(kw) or argparse.Namespace(report=""))
    return calls


def test_a_new_field_is_a_flag_with_its_help_and_reaches_the_library(new_field, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--label-smoothing LABEL_SMOOTHING share of the target probability spread over the vocabulary " \
           "(default: 0.0)" in help_text
    assert main(["train", "--out", str(tmp_path / "run"), "--label-smoothing", "0.1", "--lr", "0.01"]) == 0
    assert new_field[0]["train_options"] == {"label_smoothing": 0.1, "lr": 0.01, "device": "auto"}
    assert main(["train", "--out", str(tmp_path / "run"), "--label-smoothing", "1"]) == 2
    assert capsys.readouterr().err.strip() == \
        "build-llm: error: --label-smoothing=1.0 is invalid; expected a number in [0, 1)"
    assert len(new_field) == 1  # refused before the library was called


def test_library_errors_name_fields_and_the_command_names_flags(capsys):
    with pytest.raises(ValueError, match=r"^FinetuneConfig: lora_rank and lora_alpha go together"):
        FinetuneConfig(task="instruct", lora_rank=4)
    with pytest.raises(ValueError, match=r"^TrainConfig: lr=-1 is invalid; expected a finite number > 0$"):
        TrainConfig(lr=-1)
    assert main(["finetune", "instruct", "--init-from", "x", "--data", "y", "--out", "z", "--lr", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "build-llm: error: --lr=-1.0 is invalid; expected a finite number > 0"
