"""The benchmark's structure and arithmetic; timings are never pinned (the machine is shared)."""

import json
import math

import pytest

from build_llm import GPTConfig
from build_llm.bench.run import decode_bytes_per_token, integrate_steps, simple_step_lengths, train_flops_per_token
from build_llm.cli import main
from build_llm.gpt import GPTModel

# Hugging Face's GPT2LMHeadModel("gpt2") has 124,439,808 parameters; 1024 x 768 of them are the
# position table, which decoding reads one row of.
GPT2_PARAMS, GPT2_WPE = 124_439_808, 1024 * 768


def test_decoding_reads_every_weight_but_the_lookup_tables():
    import torch
    with torch.device("meta"):
        model = GPTModel(GPTConfig.from_preset("gpt2-small"))
    assert decode_bytes_per_token(model) == 4 * (GPT2_PARAMS - GPT2_WPE)
    with torch.device("meta"):
        book = GPTModel(GPTConfig.from_preset("book-124m"))  # untied: its token table is only looked up
    assert decode_bytes_per_token(book) == 4 * (163_009_536 - GPT2_WPE - 50257 * 768)


def test_training_flops_follow_the_palm_formula():
    n = GPT2_PARAMS - GPT2_WPE
    assert train_flops_per_token(GPTConfig.from_preset("gpt2-small")) == 6 * n + 12 * 12 * 1024 * 768


def test_step_integration_is_exact_for_a_linear_cost():
    lengths = simple_step_lengths(6, 1000, 6)
    assert lengths[0] == 6 and lengths[-1] == 1005 and len(lengths) == 6
    cost = lambda t: 0.5 + 0.01 * t  # noqa: E731
    exact = sum(cost(t) for t in range(6, 1006))
    assert integrate_steps(lengths, [cost(t) for t in lengths]) == pytest.approx(exact, rel=1e-12)


def test_quick_bench_json_table_and_chart(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be, that is the question\n" * 200, encoding="utf-8")
    assert main(["bench", "--quick", "--json", "--out", str(tmp_path / "out"), "--text", str(text)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r) >= {"machine", "ceilings", "decoding", "training", "memory", "ratios", "goals", "elapsed_s"}
    positive = [r["ceilings"]["bandwidth_gbs"], *r["ceilings"]["matmul_gflops"].values(), *r["ratios"].values()]
    positive += [*r["decoding"]["tokens_per_s"].values(), *r["decoding"]["fraction_of_bound"].values()]
    positive += [*r["train_cli"]["tokens_per_s"].values()]  # read from build-llm train's metrics.jsonl
    for t in r["training"]:
        positive += [*t["tokens_per_s"].values(), *t["mfu"].values()]
        assert set(t["tokens_per_s"]) == {"ours", "ours bf16 autocast", "hf", "hf bf16 autocast"}
        assert all(len(v) == r["rounds"] for v in t["rounds"].values())
    for value in positive:
        assert isinstance(value, float) and math.isfinite(value) and value > 0
    assert {"decoding vs hf", "cached vs seed-style at 40"} <= set(r["ratios"])
    assert r["decoding"]["same_tokens_as_hf"] is True  # same weights, same greedy tokens
    assert set(r["decoding"]["tokens_per_s"]) == {"ours", "ours bf16 weights", "ours int8 weights", "hf generate"}
    assert {"decoding bf16 weights vs hf", "decoding int8 weights vs hf"} <= set(r["ratios"])
    tiny = r["tiny_decoding"]  # the r-abc row: ours (one thread), ours on every thread, the seed's loop
    assert tiny["same_tokens"] is True and tiny["new_tokens"] == 40 and tiny["model"]["emb_dim"] == 128
    assert len(tiny["tokens_per_s"]) == 3 and "seed generate_text_simple" in tiny["tokens_per_s"]
    assert {"r-abc ours vs seed"} <= set(r["ratios"]) and "decoding r-abc" in (tmp_path / "out" / "bench.txt").read_text()
    w = r["decoding"]["weight_bytes_per_token"]
    assert w["bfloat16"] < 0.6 * w["float32"] and w["int8"] < 0.4 * w["float32"]  # Linear weights in 2 and 1 bytes
    for g in r["goals"]:
        assert isinstance(g["met"], bool) and g["met"] == (g["value"] >= g["target"])
    for v in r["memory"].values():
        assert "error" not in v and v["peak_rss_mb"] > v["above_torch_mb"] > 0  # not the parent's peak
    out = tmp_path / "out"
    assert json.loads((out / "bench.json").read_text()) == r
    assert "ratios" in (out / "bench.txt").read_text()
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, named", [(["--png", "chart.jpg"], "--png"), (["--text", "no/such/file.txt"], "--text"),
                                         (["--checkpoint", "no/such/run"], "no/such/run")])
def test_bad_input_is_one_line_and_exit_2(argv, named, capsys):
    assert main(["bench", "--quick", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and named in err


def test_heldout_perplexity_of_the_decoding_dtypes_against_hugging_face(tmp_path):
    import torch
    import torch.nn.functional as F

    from build_llm.bench.run import bench_perplexity, heldout_ids
    from build_llm.store.checkpoint import save_checkpoint
    from build_llm.interop.hf import to_hf
    from build_llm.data.tokenizer import CharTokenizer

    text = "".join(f"{i} bottles of beer on the wall, {i} bottles of beer.\n" for i in range(99, 0, -1))
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("gpt2-small", vocab_size=tok.vocab_size, context_length=32, emb_dim=32,
                                           n_heads=4, n_layers=2)).eval()
    save_checkpoint(tmp_path / "ckpt", model, tok)
    r = bench_perplexity(tmp_path / "ckpt", tmp_path / "text.txt", max_windows=4, log=lambda m: None)
    ids, source = heldout_ids(tok, tmp_path / "text.txt")
    assert ids == tok.encode(text)[-(len(tok.encode(text)) // 10):] and "last 10%" in source
    # float32: the exp of Hugging Face's cross-entropy on the same four windows with the same weights
    data = torch.tensor(ids[:4 * 32 + 1])
    with torch.no_grad():
        logits = to_hf(model).eval()(data[:-1].view(4, 32)).logits
    expected = math.exp(F.cross_entropy(logits.flatten(0, 1), data[1:]).item())
    assert r["tokens"] == 128 and r["perplexity"]["float32"] == pytest.approx(expected, rel=1e-5)
    for dtype, limit in (("bfloat16", 0.01), ("int8", 0.03)):
        assert abs(r["relative_change"][dtype]) < limit
        assert r["relative_change"][dtype] == pytest.approx(r["perplexity"][dtype] / expected - 1, abs=1e-4)
