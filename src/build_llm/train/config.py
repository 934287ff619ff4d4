"""Training settings as validated, frozen dataclasses, stored as JSON in every checkpoint:
TrainConfig (pretraining) and FinetuneConfig (classification and instruction fine-tuning)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from build_llm import lora as lora_mod
from build_llm.errors import UsageError
from build_llm.store.finetuned import CLASSIFY_TRAINABLE

LR_DECAYS = ("cosine", "constant")
TASKS = ("classify", "instruct")
RESUMABLE = ("epochs", "steps", "eval_every", "device")  # what a resumed fine-tuning run may change


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and loop settings, validated; stored as JSON in every checkpoint."""
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 100
    lr_decay: str = "cosine"        # cosine from lr down to min_lr_ratio * lr at the last step
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0          # max global gradient norm; 0 turns clipping off
    grad_accum: int = 1             # micro-batches per optimizer step
    batch_size: int = 64            # windows per micro-batch, summed over all processes
    steps: int = 1000               # total optimizer steps (also when resuming)
    eval_every: int = 100           # evaluate, log and checkpoint every this many steps
    eval_batches: int = 20          # fixed validation batches per evaluation
    seed: int = 123
    device: str = "auto"
    dtype: str = "float32"          # bfloat16: autocast around forward and loss
    compile: bool = False
    fsdp: bool = False              # under torchrun: shard parameters, gradients and optimizer state
    val_ratio: float = 0.1

    def __post_init__(self) -> None:
        def bad(key: str, expected: str) -> ValueError:
            return UsageError(f"TrainConfig: {key}={getattr(self, key)!r} is invalid; expected {expected}")

        def number(key: str) -> float:
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(key, "a finite number")
            return v

        if not number("lr") > 0:
            raise bad("lr", "a number > 0")
        if number("weight_decay") < 0:
            raise bad("weight_decay", "a number >= 0")
        if number("grad_clip") < 0:
            raise bad("grad_clip", "a number >= 0 (0: no clipping)")
        if not 0 <= number("min_lr_ratio") <= 1:
            raise bad("min_lr_ratio", "a number in [0, 1]")
        if not 0 < number("val_ratio") < 1:
            raise bad("val_ratio", "a number in (0, 1)")
        betas = self.betas
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise bad("betas", "two numbers in [0, 1)")
        object.__setattr__(self, "betas", tuple(float(b) for b in betas))
        for key, low in (("grad_accum", 1), ("batch_size", 1), ("steps", 1), ("eval_every", 1),
                         ("eval_batches", 1), ("warmup_steps", 0), ("seed", 0)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise bad(key, f"an integer >= {low}")
        if self.lr_decay not in LR_DECAYS:
            raise bad("lr_decay", f"one of {LR_DECAYS}")
        if self.dtype not in ("float32", "bfloat16"):
            raise bad("dtype", "float32 or bfloat16")
        if not isinstance(self.device, str) or not self.device:
            raise bad("device", "auto, cpu, cuda or cuda:N")
        for key in ("compile", "fsdp"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "true or false")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise UsageError(f"TrainConfig: unknown key(s) {unknown}; valid keys are {valid}")
        return cls(**{**d, **({"betas": tuple(d["betas"])} if "betas" in d else {})})

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


# The R notebook's ABC experiment: AdamW at lr 0.003 (torch's default betas and weight decay, as R's
# optim_adamw), batch 64, 80/20 split. The notebook keeps the lr constant for 400 steps; a short
# warm-up and a cosine decay over more steps bring the loss to within 0.01 nats of the optimum.
ABC_TRAIN = TrainConfig(lr=0.003, weight_decay=0.01, betas=(0.9, 0.999), warmup_steps=50, lr_decay="cosine",
                        min_lr_ratio=0.05, grad_clip=1.0, batch_size=64, steps=800, eval_every=100,
                        eval_batches=20, seed=1, val_ratio=0.2)


# A budgeted run trains the model family of the sweep behind the rule at the sweep's settings.
BUDGET_TRAIN = TrainConfig(lr=2e-3, batch_size=16, warmup_steps=100, eval_every=100, eval_batches=20)


# --- fine-tuning -------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneConfig:
    task: str
    epochs: int = 3
    steps: int | None = None            # total optimizer steps (overrides epochs)
    batch_size: int = 8
    micro_batch_size: int | None = None  # gradient accumulation: batch_size split into micro-batches
    lr: float = 5e-5
    weight_decay: float = 0.1
    grad_clip: float = 0.0
    eval_every: int | None = None        # steps; None: at the end of every epoch
    val_fraction: float = 0.1            # held out from --data when no --val-data is given
    max_length: int | None = None        # tokens per example (default: the context length)
    seed: int = 123
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = lora_mod.DEFAULT_TARGETS
    trainable: str = "last-block"        # classify without LoRA: "last-block" (the book's) or "all"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise UsageError(f"task={self.task!r} is invalid; expected one of {TASKS}")
        for key in ("epochs", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"--{key.replace('_', '-')}={value!r} is invalid; expected an integer >= 1")
        for key in ("steps", "micro_batch_size", "eval_every", "max_length"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"--{key.replace('_', '-')}={value!r} is invalid; expected an integer >= 1")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise UsageError(f"--micro-batch-size={self.micro_batch_size} does not divide --batch-size="
                             f"{self.batch_size}; choose a divisor")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr={self.lr!r} is invalid; expected a number > 0")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UsageError(f"--weight-decay={self.weight_decay!r} is invalid; expected a number >= 0")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise UsageError(f"--grad-clip={self.grad_clip!r} is invalid; expected a number >= 0 (0: off)")
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"--val-fraction={self.val_fraction!r} is invalid; expected a number in (0, 1)")
        if (self.lora_rank is None) != (self.lora_alpha is None):
            raise UsageError("--lora-rank and --lora-alpha go together; give both or neither")
        if self.trainable not in CLASSIFY_TRAINABLE:
            raise UsageError(f"--trainable={self.trainable!r} is invalid; expected one of {list(CLASSIFY_TRAINABLE)}")
        if self.trainable != "last-block" and (self.task != "classify" or self.lora_rank is not None):
            raise UsageError(f"--trainable {self.trainable} applies to a classification fine-tune without LoRA "
                             "(an instruction fine-tune trains every weight, a LoRA run only its adapters)")
        if self.lora_rank is not None:
            lora_mod.check_rank_alpha(self.lora_rank, self.lora_alpha)
            object.__setattr__(self, "lora_targets", lora_mod.check_targets(self.lora_targets))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneConfig":
        return cls(**{**d, "lora_targets": tuple(d.get("lora_targets", lora_mod.DEFAULT_TARGETS))})
