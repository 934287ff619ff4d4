"""Benchmarks against peers, measured side by side in one run (`build-llm bench`).

Every comparison runs its candidates in alternating rounds inside this one process (A B C, A B C,
...), so that a machine that gets busier or quieter part-way slows every candidate alike; the report
gives the median of the rounds and ratios of medians, never a single timing.

- suite: what a run measures (full or `--quick`) and the alternating rounds.
- ceilings: memory bandwidth and matrix-multiply FLOP/s, measured in the same run; decoding is
  reported as a fraction of the bandwidth bound (weight bytes read per token), training as model
  FLOPs utilisation (sizing.train_flops_per_token) against the measured matmul rate of its dtype.
- ceilings also reports the CPU's cache levels; the bandwidth buffer is several times the largest, and
  each dtype's decoding weights are reported with the level they fit in ("DRAM": none).
- decode: gpt2-small (random weights) decoding with this package's cached `generate` (fp32, bf16, int8
  and int4 decoding weights) vs Hugging Face's `generate` on the same weights vs the seed's
  `generate_text_simple`; smollm2-360m (random weights, the Llama shape) with bf16 and int8 decoding
  weights vs `LlamaForCausalLM.generate` fp32, its ratios beside gpt2-small's; and the tiny r-abc
  model on one thread vs every thread.
- prefill: a 512-token prompt through each decoding dtype (the head for the last position only) vs
  Hugging Face's forward over the same prompt.
- steady: int8 decoding in several fresh processes under each of a few process-wide settings (thread
  placement, OpenMP wait policy, huge pages): how much a process's speed varies, and with what.
- serve: the int8 server (`build-llm serve` in its own process, real HTTP) with one streaming client
  and 16 at once, against the same model's `generate` alone; every reply must be generate's text.
- train: one optimizer step of GPTModel vs GPT2LMHeadModel, fp32 and bf16 autocast; and the
  user-facing `build-llm train` run in a fresh process.
- memory: peak memory of decoding and training, each in a fresh child process.
- perplexity (with `--checkpoint`): fp32 vs bf16 vs int8 vs int4 decoding weights on held-out text.
- report: the run in order, its ratios and goals, as a table, a chart and JSON.
"""

from build_llm.bench.report import format_report, plot_report, run_bench, to_json, write_report

__all__ = ["format_report", "plot_report", "run_bench", "to_json", "write_report"]
