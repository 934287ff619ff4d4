"""The run and its report: every measurement in order, the ratios and goals drawn from them, and
the results as a table, a bar chart and JSON."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from build_llm.bench.ceilings import measure_ceilings
from build_llm.bench.decode import (add_bandwidth_bounds, add_cache_levels, bench_decoding, bench_llama_decoding,
                                     bench_tiny_decoding, decoding_models)
from build_llm.bench.memory import bench_memory
from build_llm.bench.perplexity import bench_perplexity
from build_llm.bench.prefill import bench_prefill
from build_llm.bench.serve import bench_serving
from build_llm.bench.steady import bench_steadiness
from build_llm.bench.suite import Suite, full_suite, quick_suite
from build_llm.bench.train import bench_train_cli, bench_training
from build_llm.runtime import cpu_has_bf16
from build_llm.store.fsio import PNG_SOFTWARE, replace_dir, save_figure


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        import transformers  # optional: only its version is reported
        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    return {"cpu": model, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "bf16_instructions": cpu_has_bf16(),
            "torch": torch.__version__,
            "transformers": hf_version, "python": platform.python_version(), "system": platform.system()}


def run_bench(quick: bool = False, text: str | os.PathLike[str] | None = None,
              log: Callable[[str], None] | None = None,
              checkpoint: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (`quick`: tiny shapes, seconds) and return its results as a JSON-ready dict.

    With `text`, also time the user-facing `build-llm train` on it (character tokenizer). With
    `checkpoint` (a trained model), also compare its held-out perplexity with float32, bfloat16, int8
    and int4 decoding weights (held out: the last 10% of `text`, or an ABC draw without text).
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    suite = quick_suite() if quick else full_suite()
    started = time.perf_counter()
    log("ceilings: memory bandwidth and matmul throughput")
    ceilings = measure_ceilings(suite)
    models = decoding_models(suite.decode_cfg)
    decoding = bench_decoding(suite, models, log)
    prefill = bench_prefill(suite, models, log)
    del models
    tiny = bench_tiny_decoding(suite, log)
    gc.collect()
    llama = bench_llama_decoding(suite, log)
    add_bandwidth_bounds(decoding, ceilings["bandwidth_gbs"])
    add_cache_levels(decoding, ceilings["caches"])
    steadiness = bench_steadiness(suite, log)
    serving = bench_serving(suite, log)
    gc.collect()
    perplexity = None
    if checkpoint is not None:
        perplexity = bench_perplexity(checkpoint, text, 8 if quick else 64, log)
    gc.collect()
    training = [bench_training(shape, suite, ceilings, log) for shape in suite.train_shapes]
    gc.collect()
    memory = bench_memory(suite, log)
    train_cli = None
    if text is not None:
        with tempfile.TemporaryDirectory(prefix="build-llm-bench-") as tmp:
            train_cli = bench_train_cli(text, suite, Path(tmp), log)
    results = {"machine": machine(), "quick": quick, "rounds": suite.rounds, "ceilings": ceilings,
               "decoding": decoding, "prefill": prefill, "steadiness": steadiness, "serving": serving, "llama_decoding": llama,
               "tiny_decoding": tiny, "training": training, "train_cli": train_cli,
               "perplexity": perplexity, "memory": memory}
    results["ratios"] = ratios(results)
    results["goals"] = goals(results, suite)
    results["elapsed_s"] = time.perf_counter() - started
    return results


def ratios(r: dict[str, Any]) -> dict[str, float]:
    """Ours over the peer for each comparison of the results `r` (above 1: ours is faster)."""
    dec, tiny = r["decoding"]["tokens_per_s"], r["tiny_decoding"]["tokens_per_s"]
    out = {
        "decoding vs hf": dec["ours"] / dec["hf generate"],
        "decoding bf16 weights vs hf": dec["ours bf16 weights"] / dec["hf generate"],
        "decoding int8 weights vs hf": dec["ours int8 weights"] / dec["hf generate"],
        **({"decoding int4 vs int8 weights": dec["ours int4 weights"] / dec["ours int8 weights"]}
           if "ours int4 weights" in dec else {}),
        **{f"cached vs seed-style at {k}": v["speedup"] for k, v in r["decoding"]["seed_style"].items()},
        **(llama_ratios(r["llama_decoding"]) if r.get("llama_decoding") else {}),
        **{f"r-abc {k} vs seed": v / tiny["seed generate_text_simple"] for k, v in tiny.items() if k.startswith("ours")},
    }
    if r.get("prefill"):
        pre = r["prefill"]["tokens_per_s"]
        out.update({f"prefill {k} vs hf forward": v / pre["hf forward"] for k, v in pre.items() if k.startswith("ours")})
        if "ours bf16 weights" in pre:
            out["prefill bf16 vs fp32 weights"] = pre["ours bf16 weights"] / pre["ours"]
    if r.get("serving"):
        out.update(serving_ratios(r["serving"]))
    for t in r["training"]:
        tps = t["tokens_per_s"]
        out[f"training {t['shape']} vs hf"] = tps["ours"] / tps["hf"]
        if "ours bf16 autocast" in tps:
            out[f"training {t['shape']} bf16 vs hf fp32"] = tps["ours bf16 autocast"] / tps["hf"]
            out[f"training {t['shape']} bf16 vs hf bf16"] = tps["ours bf16 autocast"] / tps["hf bf16 autocast"]
    if r["train_cli"] is not None:
        cli_tps, hf_tps = r["train_cli"]["tokens_per_s"], r["training"][0]["tokens_per_s"]["hf"]
        out["build-llm train fp32 vs hf"] = cli_tps["float32"] / hf_tps
        if "bfloat16" in cli_tps:
            out["build-llm train bf16 vs hf fp32"] = cli_tps["bfloat16"] / hf_tps
    return out


def serving_ratios(serving: dict[str, Any]) -> dict[str, float]:
    tps, many = serving["tokens_per_s"], f"server, {serving['streams']} streams"
    return {"server 1 stream vs model alone": tps["server, 1 stream"] / tps["model alone (generate)"],
            f"server {serving['streams']} streams vs 1 stream": tps[many] / tps["server, 1 stream"]}


def llama_ratios(llama: dict[str, Any]) -> dict[str, float]:
    tps = llama["tokens_per_s"]
    return {f"{llama['name']} {k} vs hf": tps[k] / tps["hf generate"] for k in ("ours bf16 weights", "ours int8 weights")}


NO_BF16 = ("not applicable: this CPU reports no bfloat16 instructions (build-llm widens bf16 weights to float32 "
           "and trains in float32 here)")


def goals(r: dict[str, Any], suite: Suite) -> list[dict[str, Any]]:
    """The speed goals (a ratio at or above its target) and, with a checkpoint, the perplexity
    goals (a relative change within its limit), each with whether it is met."""
    ratio, first = r["ratios"], r["training"][0]["shape"]
    speed = [
        ("decoding >= 1.5x hf generate (fp32)", ratio["decoding vs hf"], 1.5),
        ("decoding >= 1.8x hf generate fp32 (bf16 weights, --dtype bfloat16)", ratio["decoding bf16 weights vs hf"], 1.8),
        ("decoding >= 2.5x hf generate fp32 (int8 weights, --dtype int8)", ratio["decoding int8 weights vs hf"], 2.5),
        ("decoding >= 75% of the bandwidth bound (fp32)", r["decoding"]["fraction_of_bound"]["ours"], 0.75),
        (f"cached >= 10x seed-style at {suite.long_tokens} tokens",
         r["decoding"]["seed_style"][str(suite.long_tokens)]["speedup"], 10.0),
        (f"training {first} >= 1.75x hf (ours bf16 autocast vs hf fp32)", ratio.get(f"training {first} bf16 vs hf fp32"), 1.75),
    ]
    name, gpt2 = r.get("llama_decoding", {}).get("name"), r["decoding"]["model"]
    for kind in ("bf16", "int8") if name else ():  # the Llama shape at least as many times faster than HF as GPT-2's
        speed.append((f"{name} decoding ({kind} weights) vs hf >= {gpt2['n_layers']}-layer gpt2's ratio",
                      ratio[f"{name} ours {kind} weights vs hf"], ratio[f"decoding {kind} weights vs hf"]))
    if r["train_cli"] is not None:
        speed.append((f"build-llm train --dtype bfloat16 >= 1.75x hf fp32 ({first})",
                      ratio.get("build-llm train bf16 vs hf fp32"), 1.75))
    if "decoding int4 vs int8 weights" in ratio:
        speed.append(("decoding int4 weights >= 1.5x int8 weights", ratio["decoding int4 vs int8 weights"], 1.5))
    if "prefill ours vs hf forward" in ratio:
        speed.append(("prefill fp32 >= 1.3x hf forward over the same prompt", ratio["prefill ours vs hf forward"], 1.3))
    if r.get("serving"):
        streams = r["serving"]["streams"]
        speed += [("server: one int8 stream >= 85% of the model alone", ratio["server 1 stream vs model alone"], 0.85),
                  (f"server: {streams} int8 streams >= 3x one stream", ratio[f"server {streams} streams vs 1 stream"], 3.0)]
    # Goals for a CPU with bfloat16 instructions (native bf16 dot products, bf16 matrix units): n/a without them.
    bf16 = r["machine"].get("bf16_instructions", True)
    speed.append(("decoding >= 2.5x hf generate fp32 (bf16 weights, a CPU with bf16 instructions)",
                  ratio["decoding bf16 weights vs hf"] if bf16 else None, 2.5))
    if "prefill bf16 vs fp32 weights" in ratio:
        speed.append(("prefill bf16 >= 1.5x our fp32 prefill (a CPU with bf16 matrix instructions)",
                      ratio["prefill bf16 vs fp32 weights"] if bf16 else None, 1.5))
    for dtype, key in (("int8", "ours int8 weights"), ("bfloat16", "ours bf16 weights")):
        if r["decoding"].get("weights_fit_in", {}).get(dtype) == "DRAM":  # a bound that holds: weights from memory
            speed.append((f"decoding {dtype} >= 75% of the DRAM bound", r["decoding"]["fraction_of_bound"][key], 0.75))
    # A goal that needs bfloat16 instructions, on a CPU without them (bf16 training is not even timed): n/a, with why.
    out = [{"goal": goal, "value": value, "target": target, "met": bool(value >= target)} if value is not None else
           {"goal": goal, "value": None, "target": target, "met": None, "why": NO_BF16} for goal, value, target in speed]
    within = []  # |value| <= target
    if r.get("steadiness"):
        default = next(iter(r["steadiness"]["settings"].values()))
        within.append((f"{r['steadiness']['processes']} fresh processes decoding int8 vary by at most +-5% (1 thread)",
                       default["spread"], 0.05))
    if r.get("serving"):
        within.append(("server: 0 errors (failed requests, texts other than generate's, a server exit other than 0)",
                        r["serving"]["errors"], 0))
    if r["perplexity"] is not None:
        for dtype, limit in (("bfloat16", 0.01), ("int8", 0.03), ("int4", 0.05)):
            if dtype in r["perplexity"]["relative_change"]:
                within.append((f"held-out perplexity with {dtype} weights within {limit:.0%} of float32",
                               r["perplexity"]["relative_change"][dtype], limit))
    return out + [{"goal": goal, "value": value, "target": limit, "met": bool(abs(value) <= limit)}
                  for goal, value, limit in within]


# --- reporting -----------------------------------------------------------------------------------
def format_decoding(r: dict[str, Any]) -> list[str]:
    d = r["decoding"]
    lines = ["", f"decoding ({d['model']['n_layers']} layers, {d['model']['emb_dim']} wide, batch 1, greedy, "
                 f"{d['prompt_tokens']}-token prompt, {d['new_tokens']} new tokens; median of {r['rounds']} rounds)",
             f"  {'':24s} {'tokens/s':>9s} {'bound':>9s} {'of bound':>9s} {'MB/token':>9s}  weights fit in"]
    dtype_of = {"ours": "float32", "hf generate": "float32", "ours bf16 weights": "bfloat16",
                "ours int8 weights": "int8", "ours int4 weights": "int4"}
    for k, v in d["tokens_per_s"].items():
        bound = d["bound_tokens_per_s"].get(k, d["bound_tokens_per_s"]["ours"])
        dtype = dtype_of.get(k, "float32")
        lines.append(f"  {k:24s} {v:9.1f} {bound:9.1f} {d['fraction_of_bound'][k]:9.0%} "
                     f"{d['weight_bytes_per_token'][dtype] / 1e6:9.1f}  {d.get('weights_fit_in', {}).get(dtype, '?')}")
    lines.append(f"  same tokens as Hugging Face: {d['same_tokens_as_hf']}; bf16 weights agree with fp32 on the first "
                 f"{d['bf16_tokens_agree']} of {d['new_tokens']} tokens, int8 on the first {d['int8_tokens_agree']}"
                 + (f", int4 on the first {d['int4_tokens_agree']}" if "int4_tokens_agree" in d else ""))
    for k, v in d["seed_style"].items():
        lines.append(f"  seed-style generate_text_simple at {k} tokens: {v['simple_tokens_per_s']:.2f} tokens/s; "
                     f"cached {v['cached_tokens_per_s']:.1f} tokens/s = {v['speedup']:.1f}x")
    return lines


def _rates(header: str, tokens_per_s: dict[str, float]) -> list[str]:
    """A section of the table: a blank line, its header, and tokens/s by name."""
    return ["", header, f"  {'':24s} {'tokens/s':>9s}"] + [f"  {k:24s} {v:9.1f}" for k, v in tokens_per_s.items()]


def format_prefill(r: dict[str, Any]) -> list[str]:
    p = r.get("prefill")
    if not p:
        return []
    return _rates(f"prefill ({p['prompt_tokens']}-token prompt into an empty KV cache; ours: the output head for the "
                  f"last position only, as generation needs; median of {r['rounds']} rounds; last logits agree with "
                  f"Hugging Face: {p['last_logits_agree_with_hf']})", p["tokens_per_s"])


def format_steadiness(r: dict[str, Any]) -> list[str]:
    st = r.get("steadiness")
    if not st:
        return []
    lines = ["", f"steadiness (int8 decoding of {st['new_tokens']} tokens in {st['processes']} fresh processes per "
                 "setting, alternating; each process the median of 3 decodes)",
             f"  {'':44s} {'median':>8s} {'+-':>6s} {'faults/token':>12s} {'huge MB':>8s}  tokens/s of each process"]
    for name, v in st["settings"].items():
        faults = "-" if v["minor_faults_per_token"] is None else f"{v['minor_faults_per_token']:.1f}"
        huge = "-" if v["huge_pages_mb"] is None else f"{v['huge_pages_mb']:.0f}"
        each = " ".join(f"{t:.1f}" for t in v["tokens_per_s"]) + "".join(f"; error: {e}" for e in v["errors"][:1])
        lines.append(f"  {name:44s} {v['median']:8.1f} {v['spread']:6.1%} {faults:>12s} {huge:>8s}  {each}")
    return lines


def format_serving(r: dict[str, Any]) -> list[str]:
    sv = r.get("serving")
    if not sv:
        return []
    header = (f"server (build-llm serve --dtype int8 --max-batch {sv['max_batch']} in its own process; streaming greedy "
              f"completions of {sv['new_tokens']} tokens over HTTP, against generate alone; median of {r['rounds']} "
              f"rounds; errors: {sv['errors']})")
    return _rates(header, sv["tokens_per_s"]) + [f"  error: {e}" for e in sv["error_samples"]]


def format_report(r: dict[str, Any]) -> str:
    """The results as the plain-text table `build-llm bench` prints."""
    m, c = r["machine"], r["ceilings"]
    caches = ", ".join(f"{k} {v / 2**20:g} MiB" for k, v in c.get("caches", {}).items()) or "not reported"
    lines = [f"machine: {m['cpu']}, {m['logical_cores']} logical cores, {m['torch_threads']} torch threads, "
             f"{m['cpu_capability']}; torch {m['torch']}, transformers {m['transformers']}; caches (one core's): {caches}",
             f"ceilings: memory bandwidth {c['bandwidth_gbs']:.1f} GB/s"
             + (f" (a {c['bandwidth_buffer_mb']} MB buffer)" if "bandwidth_buffer_mb" in c else "")
             + f"; matmul {c['matmul_gflops']['float32']:.0f} GFLOP/s fp32, {c['matmul_gflops']['bfloat16']:.0f} GFLOP/s bf16"]
    lines += format_decoding(r) + format_prefill(r) + format_steadiness(r) + format_serving(r) + llama_lines(r)
    tiny = r["tiny_decoding"]
    lines += ["", f"decoding r-abc ({tiny['model']['n_layers']} layers, {tiny['model']['emb_dim']} wide, context "
                  f"{tiny['model']['context_length']}; {tiny['new_tokens']} characters from \"A\", greedy; same "
                  f"characters: {tiny['same_tokens']})", f"  {'':24s} {'tokens/s':>9s}"]
    lines += [f"  {k:24s} {v:9.1f}" for k, v in tiny["tokens_per_s"].items()]
    for t in r["training"]:
        cfg = t["model"]
        lines += ["", f"training {t['shape']} ({cfg['n_layers']} layers, {cfg['n_heads']} heads, {cfg['emb_dim']} wide, "
                      f"context {cfg['context_length']}, vocab {cfg['vocab_size']}, batch {t['batch_size']}, dropout "
                      f"{cfg['drop_rate']}, AdamW; {t['flops_per_token'] / 1e6:.0f} MFLOP/token)",
                  f"  {'':24s} {'tokens/s':>9s} {'MFU':>6s}"]
        for k, v in t["tokens_per_s"].items():
            lines.append(f"  {k:24s} {v:9.0f} {t['mfu'][k]:6.0%}")
    if r.get("train_cli"):
        c = r["train_cli"]
        lines += ["", f"build-llm train --data TEXT --tokenizer char --batch-size 8 ({c['steps']} steps, its metrics.jsonl)"]
        for k, v in c["tokens_per_s"].items():
            bits = c.get("val_bits_per_char", {}).get(k)
            lines.append(f"  {k:24s} {v:9.0f} tokens/s" + (f", validation {statistics.median(c['val_loss'][k]):.4f} nats/token"
                                                          f" = {statistics.median(bits):.4f} bits/char" if bits else ""))
    if r.get("perplexity"):
        p = r["perplexity"]
        lines += ["", f"perplexity of {p['checkpoint']} on {p['text']} ({p['tokens']} tokens)"]
        for k, v in p["perplexity"].items():
            change = p["relative_change"].get(k)
            lines.append(f"  {k:24s} {v:9.4f}" + ("" if change is None else f"  {change:+.2%} vs float32"))
    lines += ["", "peak memory (RSS above an interpreter with torch imported, fresh process each)"]
    for k, v in r["memory"].items():
        lines.append(f"  {k:24s} " + (f"{v['above_torch_mb']:8.0f} MB" if "error" not in v else v["error"]))
    lines.append(f"  KV cache of the decoding model (its whole context, fp32): {r['decoding']['kv_cache_bytes'] / 2**20:.0f} MB")
    lines += ["", "ratios"] + [f"  {k:44s} {v:7.2f}x" for k, v in r["ratios"].items()]
    lines += ["", "goals"] + [f"  [n/a] {g['goal']}: {g['why']}" if g["met"] is None else
                              f"  [{'met' if g['met'] else 'NOT met'}] {g['goal']}: "
                              + (f"{g['value']:+.2%}" if "perplexity" in g["goal"] or "+-" in g["goal"]
                                 else f"{g['value']:.2f}")
                              for g in r["goals"]]
    lines.append(f"\n(benchmark took {r['elapsed_s']:.0f} s)")
    return "\n".join(lines)


def llama_lines(r: dict[str, Any]) -> list[str]:
    llama, rounds = r.get("llama_decoding"), r["rounds"]
    if not llama:
        return []
    cfg, agree = llama["model"], llama["tokens_agree_with_hf"]
    lines = ["", f"decoding {llama['name']} ({cfg['n_layers']} layers, {cfg['emb_dim']} wide, {cfg['n_heads']} query heads "
                 f"to {cfg['n_kv_heads']} key/value heads, random weights, batch 1, greedy, {llama['prompt_tokens']}-token "
                 f"prompt, {llama['new_tokens']} new tokens; median of {rounds} rounds)", f"  {'':24s} {'tokens/s':>9s}"]
    lines += [f"  {k:24s} {v:9.1f}" for k, v in llama["tokens_per_s"].items()]
    lines.append(f"  tokens equal to Hugging Face fp32's: the first {agree['bfloat16']} with bf16 weights, "
                 f"{agree['int8']} with int8 (of {llama['new_tokens']})")
    return lines


def plot_report(r: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """A PNG bar chart: tokens/s of each candidate, decoding and each training shape side by side."""
    import matplotlib  # optional: only the chart needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: only the chart needs it

    d = r["decoding"]
    panels = [(f"decoding ({d['new_tokens']} tokens)", {**d["tokens_per_s"], "seed-style": d["seed_style"][str(d["new_tokens"])]["simple_tokens_per_s"]})]
    if r.get("prefill"):
        panels.append((f"prefill ({r['prefill']['prompt_tokens']} tokens)", r["prefill"]["tokens_per_s"]))
    if r.get("serving"):
        panels.append(("server (int8)", r["serving"]["tokens_per_s"]))
    if r.get("llama_decoding"):
        panels.append((f"decoding {r['llama_decoding']['name']}", r["llama_decoding"]["tokens_per_s"]))
    panels += [(f"training {t['shape']}", t["tokens_per_s"]) for t in r["training"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.2), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels):
        names = list(values)
        bars = ax.barh(names, [values[n] for n in names],
                       color=["tab:blue" if n.startswith("ours") else "tab:gray" for n in names])
        ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tokens/s")
        ax.margins(x=0.2)
    fig.suptitle(f"build-llm bench on {r['machine']['cpu']} ({r['machine']['torch_threads']} threads)", fontsize=10)
    fig.tight_layout()
    png = Path(path).suffix in ("", ".png")
    try:  # the Software tag says the PNG is ours (fsio.written_by_us)
        return save_figure(fig, path, dpi=110, metadata={"Software": PNG_SOFTWARE} if png else None)
    finally:
        plt.close(fig)


def write_report(r: dict[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    """bench.json, bench.txt and bench.png in `out_dir`, all three or none: they are written in a
    temporary sibling that then takes the place of `out_dir` whole (fsio.replace_dir), so a full disk
    leaves the previous report, or nothing, never part of one."""
    with replace_dir(out_dir, "bench") as tmp:
        (tmp / "bench.json").write_text(to_json(r) + "\n", encoding="utf-8")
        (tmp / "bench.txt").write_text(format_report(r) + "\n", encoding="utf-8")
        plot_report(r, tmp / "bench.png")
    return Path(out_dir)


def to_json(r: dict[str, Any]) -> str:
    def clean(v: Any) -> Any:  # JSON has no inf or nan: such a value is reported as null
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(r), indent=2)
