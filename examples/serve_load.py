"""Load test of `build-llm serve`: one streaming client alone, then N concurrent streaming clients.

Starts the server itself (so that it can watch its memory), on 127.0.0.1 only:

    python examples/serve_load.py --preset gpt2-small --clients 16 --seconds 60 [--dtype int8] [--out DIR]

Each client sends streaming completions one after another (a short prompt, `--max-tokens` new tokens,
temperature 0.8, usage reported in the stream) until its time is up. Reported: errors, aggregate
completion tokens/s of the N clients against the one client alone (the batching speed-up), time to
first token (p50 / p95), and the server's resident memory sampled every second (start, end, peak).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPTS = ["The meaning of life is", "Once upon a time, in a land far away,", "The best way to learn programming is",
           "In 1905, Albert Einstein", "The recipe calls for two cups of", "My favourite season is autumn because",
           "The ship sailed into the harbour at dawn", "Machine learning models are trained by"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one_request(port: int, model: str, prompt: str, max_tokens: int, timeout: float) -> tuple[float, int]:
    """(seconds to the first token, completion tokens) of one streaming completion."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8,
                       "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
        first, tokens, done = None, None, False
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        if not done or tokens is None or first is None:
            raise RuntimeError("the stream ended early")
        return first, tokens
    finally:
        conn.close()


def run_clients(port: int, model: str, clients: int, seconds: float, max_tokens: int) -> dict:
    ttft: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(i: int) -> None:
        k = i
        while time.perf_counter() < deadline:
            try:
                first, n = one_request(port, model, PROMPTS[k % len(PROMPTS)], max_tokens, timeout=300)
                with lock:
                    ttft.append(first)
                    tokens[0] += n
            except Exception as e:  # counted, reported
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
            k += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start  # includes finishing the requests in flight at the deadline
    q = statistics.quantiles(ttft, n=20) if len(ttft) >= 2 else [float("nan")] * 19
    return {"clients": clients, "seconds": elapsed, "requests": len(ttft), "errors": len(errors),
            "error_samples": errors[:5], "completion_tokens": tokens[0], "tokens_per_s": tokens[0] / elapsed,
            "ttft_p50_s": statistics.median(ttft) if ttft else float("nan"), "ttft_p95_s": q[18]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset")
    src.add_argument("--checkpoint")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "int8"))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--solo-seconds", type=float, default=30.0, help="how long the one client runs alone")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", help="directory for load.json")
    args = p.parse_args()

    port = free_port()
    source = ["--preset", args.preset] if args.preset else ["--checkpoint", args.checkpoint]
    cmd = [sys.executable, "-m", "build_llm.cli", "serve", *source, "--port", str(port), "--dtype", args.dtype,
           "--max-batch", str(max(args.clients, 1)), "--max-queue", str(4 * max(args.clients, 1))]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    memory: list[tuple[float, float]] = []
    stop_sampling = threading.Event()
    try:
        model = None
        for _ in range(600):
            if server.poll() is not None:
                print(f"the server exited: {server.stderr.read()}", file=sys.stderr)
                return 1
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/v1/models")
                model = json.loads(conn.getresponse().read())["data"][0]["id"]
                break
            except OSError:
                time.sleep(0.5)
        if model is None:
            print("the server did not start", file=sys.stderr)
            return 1
        one_request(port, model, PROMPTS[0], 8, timeout=300)  # warm-up

        def sample() -> None:
            t0 = time.perf_counter()
            while not stop_sampling.wait(1.0):
                memory.append((time.perf_counter() - t0, rss_mb(server.pid)))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        print(f"1 client for {args.solo_seconds:.0f} s ...", file=sys.stderr, flush=True)
        solo = run_clients(port, model, 1, args.solo_seconds, args.max_tokens)
        mark = len(memory)
        print(f"{args.clients} clients for {args.seconds:.0f} s ...", file=sys.stderr, flush=True)
        loaded = run_clients(port, model, args.clients, args.seconds, args.max_tokens)
        stop_sampling.set()
        sampler.join()
    finally:
        stop_sampling.set()
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(120)
            except subprocess.TimeoutExpired:
                server.kill()
    under_load = [m for _, m in memory[mark:]] or [float("nan")]
    result = {"server": cmd[3:], "dtype": args.dtype, "max_tokens": args.max_tokens, "solo": solo, "loaded": loaded,
              "speedup": loaded["tokens_per_s"] / solo["tokens_per_s"],
              "memory_mb": {"start": under_load[0], "end": under_load[-1], "peak": max(under_load),
                            "samples": [round(m, 1) for m in under_load]},
              "server_exit_code": server.returncode, "cpu_count": os.cpu_count()}
    print(f"one client alone : {solo['tokens_per_s']:.1f} tokens/s, ttft p50 {solo['ttft_p50_s']:.2f} s, "
          f"{solo['requests']} requests, {solo['errors']} errors")
    print(f"{args.clients} clients       : {loaded['tokens_per_s']:.1f} tokens/s aggregate "
          f"({result['speedup']:.2f}x one client), ttft p50 {loaded['ttft_p50_s']:.2f} s / p95 "
          f"{loaded['ttft_p95_s']:.2f} s, {loaded['requests']} requests, {loaded['errors']} errors")
    m = result["memory_mb"]
    print(f"server memory    : {m['start']:.0f} MB at the start of the load, {m['end']:.0f} MB at the end, "
          f"peak {m['peak']:.0f} MB; server exit code {server.returncode}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "load.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0 if loaded["errors"] == 0 and solo["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
