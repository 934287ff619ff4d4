"""`make test-gpu`: the GPU path proven on one CUDA device, in a few minutes. Without CUDA every GPU
test skips with its reason; the arithmetic they rely on (MFU) is checked everywhere.

On a GPU: training's loss falls in float32, bfloat16 (where the GPU has it), float16 (with its
gradient scaler) and compiled; a fixed tiny float32 run gives the CPU's losses; greedy decoding with
the KV cache gives the CPU's tokens; 2-process DDP (on 2 GPUs: NCCL runs one process per GPU);
and the tokens/s and MFU of the shakespeare-char shape and gpt2-small are printed."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from build_llm import GPTConfig, GPTModel
from build_llm.data.corpus import prepare_corpus
from build_llm.infer.generate import generate
from build_llm.sizing import count_parameters, train_flops_per_token
from build_llm.train.config import TrainConfig
from build_llm.train.distributed import Dist
from build_llm.train.loop import grad_scaler, make_optimizer, train_step
from build_llm.train.pretrain import DATA_DEFAULT_MODEL, micro_batches, train

pytestmark = pytest.mark.gpu

CUDA = torch.cuda.is_available()
NO_CUDA = (f"no CUDA device (torch {torch.__version__}"
           + (": a CPU build; install a CUDA build of torch" if torch.version.cuda is None else "") + ")")
requires_cuda = pytest.mark.skipif(not CUDA, reason=NO_CUDA)

# Dense peak tensor-core FLOP/s in 16-bit (bf16, or fp16 where a GPU has no bf16), by device name.
PEAK_FLOPS = {"H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "4090": 165e12,
              "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def mfu(cfg: GPTConfig, tokens_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation: the training FLOPs a second of these tokens takes, over the peak."""
    return train_flops_per_token(cfg) * tokens_per_s / peak


def test_mfu_arithmetic():
    cfg = GPTConfig(vocab_size=65, context_length=256, emb_dim=384, n_heads=6, n_layers=6, drop_rate=0.0)
    assert mfu(cfg, 1e6, train_flops_per_token(cfg) * 2e6) == pytest.approx(0.5)
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_flops("a mystery GPU") is None


def abc(tmp_path):
    from build_llm.data.markov import abc_text

    path = tmp_path / "abc.txt"
    path.write_text(abc_text(20000, seed=1), encoding="utf-8")
    return prepare_corpus(path, "char", tmp_path / "data", 0.2)


def tiny(vocab: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                     qkv_bias=False)


def losses(tmp_path, device: str, **train_options) -> list[float]:
    corpus, tok = abc(tmp_path)
    cfg = TrainConfig(batch_size=16, steps=40, eval_every=10, eval_batches=2, warmup_steps=5, lr=3e-3, seed=1,
                      val_ratio=0.2).replace(**train_options)
    result = train(tmp_path / f"run-{device}-{cfg.dtype}-{cfg.compile}", tiny(tok.vocab_size), cfg, corpus, tok,
                   device=torch.device(device), log=lambda s: None)
    return [row["train_loss"] for row in result.history]


@requires_cuda
@pytest.mark.parametrize("options", [dict(), dict(dtype="bfloat16"), dict(dtype="float16"), dict(compile=True)])
def test_loss_falls_on_the_gpu(tmp_path, options):
    if options.get("dtype") == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no bfloat16")
    rows = losses(tmp_path, "cuda", **options)
    assert rows[-1] < rows[0] - 0.3, rows


@requires_cuda
def test_the_gpu_gives_the_cpus_losses(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 products as the CPU computes them
    cpu, gpu = losses(tmp_path, "cpu", steps=10, eval_every=5), losses(tmp_path, "cuda", steps=10, eval_every=5)
    assert np.allclose(cpu, gpu, atol=2e-4), (cpu, gpu)


@requires_cuda
def test_kv_cached_decoding_gives_the_cpus_tokens():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=500, context_length=128, emb_dim=128, n_heads=4, n_layers=3,
                               drop_rate=0.0)).eval()
    prompt = torch.randint(0, 500, (2, 10))
    cpu = generate(model, prompt, 60, use_cache=True)
    gpu = generate(model.to("cuda"), prompt.to("cuda"), 60, use_cache=True).cpu()
    assert torch.equal(cpu, gpu)


@requires_cuda
@pytest.mark.skipif(CUDA and torch.cuda.device_count() < 2, reason="2-process DDP needs 2 GPUs (NCCL runs one "
                    "process per GPU)")
def test_two_process_ddp(tmp_path):
    from build_llm.data.markov import abc_text

    data = tmp_path / "abc.txt"
    data.write_text(abc_text(20000, seed=1), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "build_llm.cli", "train", "--data", str(data), "--tokenizer", "char", "--out",
                           str(tmp_path / "run"), "--steps", "20", "--eval-every", "10", "--device", "cuda"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation loss" in proc.stdout


def throughput(cfg: GPTConfig, batch_size: int, steps: int = 10) -> float:
    """Training tokens per second of `cfg` on cuda:0 in bfloat16 (float16 without it), fused AdamW."""
    dtype = "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    device = torch.device("cuda")
    model = GPTModel(cfg).to(device).train()
    tcfg = TrainConfig(batch_size=batch_size, dtype=dtype)
    optimizer, scaler = make_optimizer(model, tcfg, device), grad_scaler(dtype, device)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 1_000_000).astype(np.uint16)
    for step in range(steps + 2):
        if step == 2:  # after warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
        train_step(model, optimizer, micro_batches(ids, step, tcfg, cfg.context_length, Dist()), device, tcfg,
                   Dist(), scaler=scaler)
    torch.cuda.synchronize()
    return steps * batch_size * cfg.context_length / (time.perf_counter() - start)


@requires_cuda
@pytest.mark.parametrize("name, batch_size", [("shakespeare-char", 64), ("gpt2-small", 8)])
def test_print_tokens_per_second_and_mfu(name, batch_size):
    cfg = (GPTConfig(**{**DATA_DEFAULT_MODEL, "vocab_size": 65, "drop_rate": 0.0}) if name == "shakespeare-char"
           else GPTConfig.from_preset("gpt2-small", drop_rate=0.0))
    rate, gpu = throughput(cfg, batch_size), torch.cuda.get_device_name()
    peak = peak_flops(gpu)
    share = f"{mfu(cfg, rate, peak):.1%} MFU" if peak else "MFU unknown (add the GPU's peak to PEAK_FLOPS)"
    print(f"\n{name} ({count_parameters(cfg) / 1e6:.1f}M parameters, batch {batch_size}) on {gpu}: "
          f"{rate:,.0f} tokens/s, {share}")
    assert rate > 0
