"""Run directories: the --out of `build-llm train` and `build-llm finetune`, and what --resume may change.

A run directory holds a checkpoint exactly when a run is resumed there; it carries the build-llm
marker of its kind ("run" or "finetune") and is locked for as long as a run writes in it. A resumed
run may change only the settings `settings.resumable` lists for its config class (when and how the
steps run, not what they compute): `check_resume` is that one rule, for every kind of run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from build_llm.config import GPTConfig
from build_llm.errors import UsageError
from build_llm.settings import resumable
from build_llm.store.checkpoint import (CHECKPOINT_DIR, PREVIOUS_DIR, check_weights_file, load_trainer_state,
                                        resolve_checkpoint)
from build_llm.store.fsio import claim_dir, lock_dir, read_json
from build_llm.train.config import TrainConfig
from build_llm.train.loop import read_metrics

RUN_KIND, FINETUNE_KIND = "run", "finetune"  # the kinds in the ownership marker of a run directory


def check_run_dir(out: str | Path, resume: bool) -> Path:
    """--out of a run: a directory that holds a checkpoint exactly when resuming."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; give a directory for the run")
    has_ckpt = (out / CHECKPOINT_DIR).exists() or (out / PREVIOUS_DIR).exists()
    if resume and not has_ckpt:
        raise UsageError(f"--resume: no checkpoint in {str(out)!r}; start without --resume to begin a run there")
    if not resume and has_ckpt:
        raise UsageError(f"--out {str(out)!r} already holds a run; add --resume to continue it or give another --out")
    return out


@contextlib.contextmanager
def owned(out: Path, kind: str, main: bool = True) -> Iterator[Path]:
    """The run directory claimed (a new or empty one, or ours of `kind`) and locked while the run
    writes there; torchrun's other processes (`main` False) write nothing and take neither."""
    if not main:
        yield out
        return
    claim_dir(out, kind)
    with lock_dir(out):
        yield out


def check_resume(saved: Any, given: Mapping[str, Any]) -> None:
    """The one resume rule: a given setting may differ from the saved config `saved` (a TrainConfig
    or FinetuneConfig) only if `resumable` lists it for that class; UsageError names the first other."""
    may_change = resumable(type(saved))
    for key, value in given.items():
        old = getattr(saved, key)
        if key not in may_change and _plain(value) != _plain(old):
            raise contradiction("option", key, old, value)


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value  # JSON and flags give lists, configs tuples


def contradiction(what: str, key: str, saved: Any, given: Any) -> UsageError:
    """The --resume error for a setting that must repeat the checkpoint's."""
    return UsageError(f"--resume: {what} {key}={given!r} contradicts the checkpoint's {key}={saved!r}; "
                      "drop the option or start a new run with another --out")


@dataclass
class Resumed:
    """What a resumed pretraining run takes from its checkpoint."""
    cfg: TrainConfig             # the saved train config with the resumable flags applied
    tokenizer: str               # the checkpoint's tokenizer.json
    state: dict[str, Any]        # trainer_state.json
    model_cfg: GPTConfig         # the saved model config


def resumed_settings(out: Path, data: str | None, train_options: dict[str, Any]) -> Resumed:
    """The checkpoint's settings of the run in `out`; the given options may change only what
    check_resume allows, and --steps must go beyond the saved step."""
    ckpt_dir = resolve_checkpoint(out)
    state = load_trainer_state(ckpt_dir).state
    saved_model = GPTConfig.from_dict(read_json(ckpt_dir / "config.json"))
    check_weights_file(ckpt_dir, saved_model)  # damaged files are the one line, before the plan is printed
    if (out / "metrics.jsonl").exists():
        read_metrics(out / "metrics.jsonl", state["step"])
    saved_cfg = TrainConfig.from_dict(state["train_config"])
    if train_options.get("steps", saved_cfg.steps) <= state["step"]:
        raise UsageError(f"--resume: the run in {str(out)!r} is already at step {state['step']}; give "
                         f"--steps above {state['step']} to train further")
    saved_source = state["data"].get("source")
    if (saved_source == "abc") != (data is None):
        raise UsageError(f"--resume: the run trained on {'the ABC source' if saved_source == 'abc' else 'a text corpus'}"
                         f"; {'drop --data' if saved_source == 'abc' else 'give the same --data'}")
    check_resume(saved_cfg, train_options)
    return Resumed(saved_cfg.replace(**train_options), str(ckpt_dir / "tokenizer.json"), state, saved_model)
