"""Training settings as validated, frozen dataclasses, stored as JSON in every checkpoint:
TrainConfig (pretraining) and FinetuneConfig (classification and instruction fine-tuning).

Each field is declared once (settings.setting): its help, its valid values, whether a resumed run
may change it (`resumable(TrainConfig)`); the `train` and `finetune` flags are made from them."""

from __future__ import annotations

from dataclasses import dataclass

from build_llm import lora as lora_mod
from build_llm.settings import DEVICE_HELP, DEVICES, Config, invalid, setting
from build_llm.store.finetuned import CLASSIFY_TRAINABLE

LR_DECAYS = ("cosine", "constant")
TASKS = ("classify", "instruct")
DTYPES = ("float32", "bfloat16", "float16")
RUNTIME, LORA = "runtime", "LoRA (appendix E)"  # --help sections


@dataclass(frozen=True)
class TrainConfig(Config):
    """Optimiser, schedule and loop settings, validated; stored as JSON in every checkpoint."""
    lr: float = setting(1e-3, "peak learning rate", above=0)
    weight_decay: float = setting(0.1, "AdamW weight decay", at_least=0)
    betas: tuple[float, float] = setting((0.9, 0.99), "AdamW betas, e.g. 0.9,0.95", at_least=0, below=1)
    warmup_steps: int = setting(100, "steps of linear warm-up", at_least=0)
    lr_decay: str = setting("cosine", "cosine: from lr down to min_lr_ratio x lr at the last step; or constant",
                            choices=LR_DECAYS)
    min_lr_ratio: float = setting(0.1, "the cosine's last learning rate, as a share of lr", at_least=0, at_most=1)
    grad_clip: float = setting(1.0, "max global gradient norm (0: no clipping)", at_least=0)
    grad_accum: int = setting(1, "micro-batches per optimizer step", at_least=1)
    batch_size: int = setting(64, "windows per micro-batch, summed over all processes", at_least=1)
    steps: int = setting(1000, "total optimizer steps, also when resuming", at_least=1, resumable=True)
    eval_every: int = setting(100, "evaluate, log and checkpoint every N steps", at_least=1, resumable=True)
    eval_batches: int = setting(20, "fixed validation batches per evaluation", at_least=1, resumable=True)
    seed: int = setting(123, "random seed", at_least=0)
    device: str = setting("auto", DEVICE_HELP + " (under torchrun: each process's local GPU)", expected=DEVICES,
                          resumable=True, group=RUNTIME)
    dtype: str = setting("float32", "bfloat16: autocast around forward and loss (float16 with a gradient scaler on "
                         "a GPU without bfloat16); float16: that, as asked", choices=DTYPES, resumable=True,
                         group=RUNTIME)
    compile: bool = setting(False, "torch.compile the model", resumable=True, group=RUNTIME)
    fsdp: bool = setting(False, "under torchrun: shard parameters, gradients and optimizer state (FSDP2)",
                         resumable=True, group=RUNTIME)
    val_ratio: float = setting(0.1, "share of the tokens held out for validation", above=0, below=1)


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
class FinetuneConfig(Config):
    """A fine-tuning run's settings, validated; stored as JSON beside its checkpoint."""
    task: str = setting(help="classify or instruct (the `finetune` subcommand)", choices=TASKS, internal=True)
    epochs: int = setting(3, "passes over the training data", at_least=1, resumable=True)
    steps: int | None = setting(None, "total optimizer steps (instead of epochs)", at_least=1, unset="from epochs",
                                resumable=True)
    batch_size: int = setting(8, "examples per optimizer step", at_least=1)
    micro_batch_size: int | None = setting(None, "examples per forward pass (gradient accumulation)", at_least=1,
                                           unset="the batch size")
    lr: float | None = setting(None, "learning rate", above=0, unset="by the base, said before the first step: "
                               "half its pretraining rate (LoRA 1.5 times it) for a small base trained here, the "
                               "book's 5e-5 for a large or imported one")
    weight_decay: float = setting(0.1, "AdamW weight decay", at_least=0)
    grad_clip: float = setting(0.0, "max gradient norm (0: no clipping)", at_least=0)
    eval_every: int | None = setting(None, "evaluate and checkpoint every N steps", at_least=1, unset="each epoch",
                                     resumable=True)
    val_fraction: float = setting(0.1, "share of the data held out when no validation file is given",
                                  above=0, below=1)
    max_length: int | None = setting(None, "tokens per example", at_least=1, unset="the context length")
    seed: int = setting(123, "random seed", at_least=0)
    lora_rank: int | None = setting(None, "train rank-R adapters instead of the weights", at_least=1,
                                    unset="no LoRA", group=LORA)
    lora_alpha: float | None = setting(None, "adapter scale: the update is multiplied by alpha / rank", above=0,
                                       unset="none; --lora-rank needs it, e.g. twice the rank", group=LORA)
    lora_targets: tuple[str, ...] = setting(lora_mod.DEFAULT_TARGETS, "layers that get adapters",
                                            choices=tuple(lora_mod.TARGETS), group=LORA)
    trainable: str | None = setting(None, "what a classification fine-tune without LoRA trains besides the new "
                                          "head: last-block (the book's: the last block and final norm) or all "
                                          "(every weight)", choices=CLASSIFY_TRAINABLE,
                                    unset="by the base: all for a small base trained here, last-block for a large "
                                          "or imported one")
    device: str = setting("auto", DEVICE_HELP, expected=DEVICES, resumable=True)

    def check(self) -> None:
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise invalid(self, f"micro_batch_size={self.micro_batch_size} does not divide batch_size="
                                f"{self.batch_size}; choose a divisor", "micro_batch_size", "batch_size")
        if (self.lora_rank is None) != (self.lora_alpha is None):
            raise invalid(self, "lora_rank and lora_alpha go together; give both (alpha is often twice the rank) or neither", "lora_rank", "lora_alpha")
        if self.trainable == "all" and (self.task != "classify" or self.lora_rank is not None):
            raise invalid(self, f"trainable={self.trainable!r} applies to a classification fine-tune without LoRA "
                                "(an instruction fine-tune trains every weight, a LoRA run only its adapters)",
                          "trainable")
