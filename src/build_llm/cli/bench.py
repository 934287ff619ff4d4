"""The bench verb: this package's speed against Hugging Face transformers, side by side."""

from __future__ import annotations

import argparse

from build_llm.bench import format_report, plot_report, run_bench, to_json, write_report
from build_llm.cli.common import verb
from build_llm.data.corpus import read_text
from build_llm.errors import UsageError
from build_llm.store.checkpoint import resolve_checkpoint
from build_llm.store.fsio import check_not_input, check_overwrite, check_writable_dir, check_writable_file


def run_bench_cli(args: argparse.Namespace) -> None:
    if args.png and not args.png.lower().endswith(".png"):
        raise UsageError(f"--png {args.png!r}: expected a file name ending in .png")
    if args.out:  # every output checked before the bench's minutes of work
        check_writable_dir(args.out, "bench", whole=True)  # replaced whole by the report
    if args.png:
        check_writable_file(args.png, "--png")
        check_not_input(args.png, {"--text": args.text, "--checkpoint": args.checkpoint}, "--png")
        check_overwrite(args.png, args.force, "--png")  # a chart of ours carries fsio.PNG_SOFTWARE
    if args.text:  # the whole bench runs before the text is used: check it first
        try:
            read_text(args.text)
        except UsageError as e:
            raise UsageError(f"--text: {e}") from None
    if args.checkpoint:
        resolve_checkpoint(args.checkpoint)  # a bad path is reported before minutes of timing
    results = run_bench(quick=args.quick, text=args.text, checkpoint=args.checkpoint)
    text, table = to_json(results), format_report(results)
    if args.out:
        write_report(results, args.out)
    if args.png:
        plot_report(results, args.png)
    print(text if args.json else table)


@verb("bench", run_bench_cli)
def add_bench(p: argparse.ArgumentParser) -> None:
    """speed against Hugging Face transformers, side by side

    Measure decoding (float32, bfloat16, int8, int4 weights), prefill of a 512-token prompt and
    training speed of this package against Hugging Face GPT2LMHeadModel of the same shape and the seed's
    generate_text_simple, in one process, in alternating rounds; report medians, ratios, the machine's
    bandwidth (through a buffer several times its largest cache) and matmul ceilings, the cache level the
    weights fit in, how int8 decoding varies between fresh processes, and peak memory. The full run
    takes several minutes; run it on a quiet machine."""
    p.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds (a smoke test, not a measurement)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    p.add_argument("--out", help="directory for bench.json, bench.txt and bench.png")
    p.add_argument("--png", help="write the bar chart to this PNG file")
    p.add_argument("--force", action="store_true", help="replace --png even if build-llm did not write it")
    p.add_argument("--text", help="also time `build-llm train` on this text file (character tokenizer), "
                                  "e.g. Shakespeare; its shape is nanoGPT's shakespeare-char")
    p.add_argument("--checkpoint", help="a trained model: compare its held-out perplexity with float32, bfloat16, "
                                        "int8 and int4 decoding weights (on the last 10%% of --text, or an ABC draw)")
