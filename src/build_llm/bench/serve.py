"""The server row: `build-llm serve`'s HTTP server (int8 weights, continuous batching) against the same model
decoding alone, in alternating rounds of one run: `generate` at batch 1 in this process (the model alone), one
streaming client, and `serve_streams` streaming clients at once, each a greedy completion of the decoding row's
prompt and length.

The server runs in a fresh process (`python -m build_llm.bench.serve '<json: cfg, port, max_batch>'` is that
child, which ends with the bench however the bench ends): the model built as every bench row builds it (random
weights, seed 0) with int8 decoding weights, served by `serve.run_server` on 127.0.0.1, as `build-llm serve
--dtype int8` serves it. The clients are threads of this
process speaking HTTP and server-sent events with the standard library (as examples/serve_load.py does): a
client's own cost stays small beside the server's. Every reply's text must be `generate`'s (the batch gives each
row what it gets alone); a failed request, another text, or a server exiting other than 0 counts as an error.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from build_llm.bench.decode import prompt_ids
from build_llm.bench.suite import Suite, alternate, medians
from build_llm.config import GPTConfig
from build_llm.data.tokenizer import GPT2_VOCAB_SIZE, CharTokenizer, get_tokenizer
from build_llm.gpt import GPTModel
from build_llm.infer.generate import generate
from build_llm.infer.quant import prepare_for_decoding
from build_llm.serve import Settings, run_server

MODEL = "bench"  # the model id the server answers to


def tokenizer_for(cfg: GPTConfig) -> Any:
    """GPT-2's tokenizer for its vocabulary; else one character a token (the quick suite's tiny vocabulary)."""
    if cfg.vocab_size == GPT2_VOCAB_SIZE:
        return get_tokenizer("gpt2")
    chars = [chr(c) for c in range(32, 127)] + [chr(c) for c in range(161, 161 + max(0, cfg.vocab_size - 96))]
    return CharTokenizer(["<PAD>", *chars[:cfg.vocab_size - 1]])


def int8_model(cfg: GPTConfig) -> GPTModel:
    torch.manual_seed(0)  # the weights every bench row decodes with
    return prepare_for_decoding(GPTModel(cfg).eval(), "int8")


def child(spec: dict[str, Any]) -> None:
    """In a fresh process: serve the int8 model until SIGTERM, or until the bench that started it ends."""
    threading.Thread(target=end_with_parent, name="end-with-parent", daemon=True).start()
    cfg = GPTConfig.from_dict(spec["cfg"])
    run_server(int8_model(cfg), tokenizer_for(cfg), Settings(model_name=MODEL, dtype="int8"), host="127.0.0.1",
               port=spec["port"], max_batch=spec["max_batch"], max_queue=4 * spec["max_batch"], log=lambda m: None)


def end_with_parent() -> None:
    """The bench holds the server's stdin open: the read returns when the bench ends, however (killed too, when
    no `finally` of its runs), and the server then stops as SIGTERM stops it, never outliving the bench. Again
    each second: a SIGTERM that arrives while run_server starts (its handler in place, uvicorn's not yet) is lost."""
    while os.read(0, 4096):  # the descriptor, not sys.stdin: no lock of its reader held when the process exits
        pass
    while True:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)


def start_server(spec: dict[str, Any], workdir: str | os.PathLike[str], err: Any) -> subprocess.Popen:
    """The server process of `spec` (stdin a pipe it watches: see end_with_parent), its stderr to `err`."""
    # `python -m` puts its working directory first on sys.path: the bench's own directory, never the user's.
    return subprocess.Popen([sys.executable, "-m", "build_llm.bench.serve", json.dumps(spec)], cwd=workdir,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err, env=dict(os.environ))


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM, as a user stops `build-llm serve`; killed if it has not ended in 120 s."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(120)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    server.stdin.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_completion(port: int, prompt: list[int], max_tokens: int) -> tuple[str, int]:
    """(text, completion tokens) of one streaming greedy completion; raises on any failure."""
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
        text, tokens = [], None
        for raw in resp:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                return "".join(text), tokens if tokens is not None else -1
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            text += [c["text"] for c in chunk["choices"]]
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        raise RuntimeError("the stream ended before [DONE]")
    finally:
        conn.close()


def wait_ready(server: subprocess.Popen, port: int, seconds: float = 600) -> None:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before it answered")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass  # not listening yet
        finally:
            conn.close()
        time.sleep(0.2)  # also after an answer other than 200: not a busy loop
    raise RuntimeError(f"the server did not answer in {seconds:.0f} s")


class Clients:
    """The streaming clients of the rounds: tokens they received, and what went wrong."""

    def __init__(self, port: int, prompt: list[int], tokens: int, expected: str) -> None:
        self.port, self.prompt, self.tokens, self.expected = port, prompt, tokens, expected
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def one(self, counts: list[int]) -> None:
        try:
            text, n = stream_completion(self.port, self.prompt, self.tokens)
            problem = None if text == self.expected else f"a text other than generate's: {text[:60]!r}"
        except Exception as e:  # counted and reported, the rounds go on
            n, problem = 0, f"{type(e).__name__}: {e}"
        with self.lock:
            counts.append(max(n, 0))
            if problem is not None:
                self.errors.append(problem)

    def streams(self, count: int) -> int:
        """`count` completions at once; the completion tokens they received."""
        counts: list[int] = []
        threads = [threading.Thread(target=self.one, args=(counts,)) for _ in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(counts)


def expected_text(tokenizer: Any, ids: list[int]) -> str:
    """What the server answers for `generate`'s new tokens `ids`: their text, up to an end token (where it stops)."""
    eos = getattr(tokenizer, "eos_id", None)
    return tokenizer.decode(ids[:ids.index(eos)] if eos in ids else ids)


def bench_serving(suite: Suite, log: Callable[[str], None]) -> dict[str, Any]:
    """Tokens/s of the model alone, one stream and `suite.serve_streams` streams (alternating rounds), and errors."""
    cfg, n, count = suite.decode_cfg, suite.decode_tokens, suite.serve_streams
    model, idx = int8_model(cfg), prompt_ids(cfg)
    expected = expected_text(tokenizer_for(cfg), generate(model, idx, n)[0, idx.shape[1]:].tolist())
    port = free_port()
    spec = {"cfg": cfg.to_dict(), "port": port, "max_batch": count}
    log(f"server: int8, 1 and {count} streams of {n} tokens against the model alone, {suite.rounds} rounds")
    with tempfile.TemporaryDirectory(prefix="build-llm-bench-") as tmp, open(Path(tmp) / "server.log", "w+") as err:
        server = start_server(spec, tmp, err)
        clients = Clients(port, idx[0].tolist(), n, expected)
        candidates = {"model alone (generate)": lambda: generate(model, idx, n).shape[1] - idx.shape[1],
                      "server, 1 stream": lambda: clients.streams(1),
                      f"server, {count} streams": lambda: clients.streams(count)}
        try:
            wait_ready(server, port)
            rates = alternate(candidates, suite.rounds)
        except RuntimeError as e:  # the server did not start: reported as an error, the bench goes on
            clients.errors.append(str(e))
            rates = {name: [float("nan")] for name in candidates}
        finally:
            stop_server(server)
            err.seek(0)
            server_log = err.read().strip().splitlines()[-3:]
    errors = clients.errors + ([f"the server exited with {server.returncode}: {server_log}"] if server.returncode else [])
    return {"streams": count, "new_tokens": n, "prompt_tokens": idx.shape[1], "max_batch": count,
            "tokens_per_s": medians(rates), "rounds": rates, "errors": len(errors), "error_samples": errors[:5]}


if __name__ == "__main__":
    child(json.loads(sys.argv[1]))
