"""Loading a checkpoint for decoding (infer/load.py): read part by part, each part converted to the decoding
dtype before the next is read. The weights equal those of the whole float32 model converted at once (what
`generate --dtype` did before), bit for bit; the peak memory is the dtype-aware estimate
(sizing.decoding_memory), far below the float32 model's, measured in a child process. Every verb that
takes --checkpoint takes a LoRA run too (merged in memory), with the merged checkpoint's results."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from build_llm import GPTConfig, GPTModel, save_checkpoint
from build_llm.cli import main
from build_llm.errors import UsageError
from build_llm.infer.load import load_decoder
from build_llm.infer.quant import DECODE_DTYPES, prepare_for_decoding
from build_llm.sizing import decoding_memory, model_memory
from tiny import WORDS, tiny_cfg, write_instruct_json

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(vocab_size=97, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0)
SHAPES = {
    "gpt2": dict(SMALL),
    "llama": dict(SMALL, pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=False, n_kv_heads=2),
}
SHAPES["moe"] = dict(SHAPES["llama"], n_experts=4, n_experts_per_token=2)  # Qwen3-MoE's: experts stacked per block


def random_model(shape: str, tied: bool) -> GPTModel:
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**SHAPES[shape], tie_weights=tied))
    with torch.no_grad():  # every weight random, biases and norms included
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("dtype", DECODE_DTYPES)
@pytest.mark.parametrize("shape, tied", [("gpt2", True), ("gpt2", False), ("llama", True), ("llama", False),
                                         ("moe", False)])
def test_part_by_part_equals_the_whole_model_converted(tmp_path, shape, tied, dtype):
    model = random_model(shape, tied)
    save_checkpoint(tmp_path / "ckpt", model)
    expected = prepare_for_decoding(model, dtype)  # the float32 model whole, then converted (today's path)
    loaded, _ = load_decoder(tmp_path / "ckpt", dtype=dtype)
    def tensors(m):  # a converted model's attention has no parameters, so no state_dict (its mask needs a device)
        return {**dict(m.named_parameters(remove_duplicate=False)), **dict(m.named_buffers(remove_duplicate=False))}

    want, got = tensors(expected), tensors(loaded)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert type(loaded.decode_step) is type(expected.decode_step)
    if dtype == "float32":
        assert (loaded.out_head.weight is loaded.tok_emb.weight) == tied
    idx = torch.randint(0, SMALL["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(idx), expected(idx))
        cache_a, cache_b = loaded.new_cache(2), expected.new_cache(2)
        loaded(idx, cache_a), expected(idx, cache_b)
        step = idx[:, -1:]
        assert torch.equal(loaded(step, cache_a), expected(step, cache_b))  # the compiled step, where it runs


def test_the_estimate_refuses_float32_but_lets_int8_load(tmp_path, monkeypatch):
    model = random_model("gpt2", True)
    save_checkpoint(tmp_path / "ckpt", model)
    cfg = model.cfg
    assert decoding_memory(cfg, "int8") < decoding_memory(cfg, "float32")
    monkeypatch.setattr("build_llm.runtime.available_memory", lambda device="cpu": decoding_memory(cfg, "int8"))
    load_decoder(tmp_path / "ckpt", dtype="int8")
    with pytest.raises(UsageError, match="needs about .* GiB of memory"):
        load_decoder(tmp_path / "ckpt", dtype="float32")


def test_int8_on_another_device_is_refused_before_reading(tmp_path):
    with pytest.raises(UsageError, match="runs on the CPU"):
        load_decoder(tmp_path / "nothing-read", device="meta", dtype="int8")


# A GPT-2-shaped model of 176 MB in float32 (12 blocks of 12.6 MB, a tied 16.8 MB token table), loaded in int8.
PEAK_CFG = dict(vocab_size=8192, context_length=128, emb_dim=512, n_heads=8, n_layers=12, drop_rate=0.0)
CHILD = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from build_llm.infer import kernels
    from build_llm.infer.load import load_decoder
    from build_llm.runtime import release_freed_memory
    from build_llm.sizing import decoding_memory, model_memory

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    kernels.available()
    load_decoder(sys.argv[2], dtype=sys.argv[3])  # the libraries' one-time costs (torch's lazy imports, ~70 MB)
    release_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS: the peak from here on
    base = status("VmRSS")
    model, _ = load_decoder(sys.argv[1], dtype=sys.argv[3])
    print(json.dumps({"peak": status("VmHWM") - base, "estimate": decoding_memory(model.cfg, sys.argv[3]),
                      "float32": model_memory(model.cfg)}))
""")


def measure_peak(tmp_path, cfg: dict, dtype: str) -> dict:
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "big", GPTModel(GPTConfig(**cfg)))
    save_checkpoint(tmp_path / "warm", GPTModel(GPTConfig(**dict(cfg, n_layers=1, emb_dim=32, vocab_size=64))))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "big"), str(tmp_path / "warm"), dtype],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_int8_peak_is_the_estimate_not_the_float32_model(tmp_path):
    """Measured on the development machine: peak 106 MB, estimate 104 MB, float32 176 MB (the whole model
    first, as before: 230 MB)."""
    m = measure_peak(tmp_path, PEAK_CFG, "int8")
    assert abs(m["peak"] - m["estimate"]) <= 0.25 * m["estimate"], m
    assert m["peak"] < 0.7 * m["float32"], m


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("dtype", ["bfloat16", "int4"])
def test_a_gpt2_medium_shaped_peak_is_the_estimate(tmp_path, dtype):
    """gpt2-medium's blocks with a smaller vocabulary: 24 blocks of 50 MB (1.2 GB in float32)."""
    m = measure_peak(tmp_path, dict(PEAK_CFG, emb_dim=1024, n_heads=16, n_layers=24), dtype)
    assert abs(m["peak"] - m["estimate"]) <= 0.25 * m["estimate"], m
    assert m["peak"] < 0.7 * m["float32"], m



# --- a LoRA run decodes as its merged checkpoint does ------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer):
    """(a LoRA instruction fine-tune, the same merged by merge-lora, its base)."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    save_checkpoint(root / "base", GPTModel(tiny_cfg(tokenizer.vocab_size)), tokenizer)
    write_instruct_json(root / "train.json", 24)
    (root / "text.txt").write_text(" ".join(WORDS * 30) + "\n")
    assert main(["finetune", "instruct", "--init-from", str(root / "base"), "--data", str(root / "train.json"),
                 "--out", str(root / "lora"), "--steps", "3", "--lr", "3e-2", "--lora-rank", "4", "--lora-alpha",
                 "8"]) == 0
    assert main(["merge-lora", "--checkpoint", str(root / "lora"), "--out", str(root / "merged")]) == 0
    return root


def cli(capsys, *args) -> str:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_generate_on_a_lora_run_gives_the_merged_checkpoints_tokens(lora_run, capsys, dtype):
    args = ("--prompt", "what colour is the", "--greedy", "--max-new-tokens", 12, "--dtype", dtype)
    adapted = cli(capsys, "generate", "--checkpoint", lora_run / "lora", *args)
    assert adapted == cli(capsys, "generate", "--checkpoint", lora_run / "merged", *args)
    assert len(adapted) > len("what colour is the\n")
    merged, base = load_decoder(lora_run / "merged")[0], load_decoder(lora_run / "base")[0]
    assert not torch.equal(merged.trf_blocks[0].att.W_query.weight, base.trf_blocks[0].att.W_query.weight)


def test_eval_inspect_and_surprisal_take_a_lora_run(lora_run, capsys, tmp_path):
    data = ("--data", lora_run / "text.txt")
    adapted = json.loads(cli(capsys, "eval", "--checkpoint", lora_run / "lora", *data))
    assert adapted == json.loads(cli(capsys, "eval", "--checkpoint", lora_run / "merged", *data))
    assert adapted != json.loads(cli(capsys, "eval", "--checkpoint", lora_run / "base", *data))
    scores = [cli(capsys, "surprisal", "--checkpoint", lora_run / run, *data, "--out", tmp_path / f"{run}.html")
              for run in ("lora", "merged")]
    assert scores[0].replace("lora", "merged") == scores[1]
    cli(capsys, "inspect", "--checkpoint", lora_run / "lora", "--prompt", "the red", "--out", tmp_path / "inspect")
