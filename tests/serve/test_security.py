"""`build-llm serve` against hostile callers (issue 20, items 2 and 12): a web page of another site cannot
send it a request or read its answers (Host names, JSON bodies only, no CORS preflight), and inputs that
used to end in a 500 or a traceback are a 4xx JSON error (a server) or one line and exit code 2 (the CLI)."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import uvicorn

from build_llm import CharTokenizer, GPTConfig, GPTModel
from build_llm.data.tokenizer import get_tokenizer
from build_llm.runtime import available_memory
from build_llm.serve import Settings, allowed_hosts, create_app
from build_llm.serve.engine import Engine
from build_llm.sizing import kv_cache_bytes
from build_llm.store.checkpoint import save_checkpoint
from tiny import Server, free_port

GOOD = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": 0}
JSON = {"Content-Type": "application/json"}
CHARS = CharTokenizer(["<PAD>", "a", "b", "c"])


def tiny_model(vocab_size: int, **kw) -> GPTModel:
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab_size, context_length=32, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)
    return GPTModel(GPTConfig(**{**cfg, **kw})).eval()


def call(port: int, method: str, path: str, body=None, headers: dict | None = None, host: str | None = None):
    """(status, headers, JSON or text) of one raw HTTP request, with the Host header given as is."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host if host is not None else f"127.0.0.1:{port}")
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        for k, v in {**(headers or {}), **({"Content-Length": str(len(data))} if data is not None else {})}.items():
            conn.putheader(k, v)
        conn.endheaders(data)
        r = conn.getresponse()
        raw = r.read()
        kind = r.getheader("content-type", "")
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(raw) if "json" in kind else raw.decode()
    finally:
        conn.close()


class LiveApp:
    """create_app's app served by uvicorn in a thread on 127.0.0.1 (a real server, in-process)."""

    def __init__(self, model: GPTModel, tokenizer, settings: Settings, engine: Engine | None = None) -> None:
        self.port = free_port()
        app = create_app(engine or Engine(model, max_batch=2, max_queue=8), tokenizer, settings)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)

    def call(self, method: str, path: str, body=None, headers: dict | None = JSON, host: str | None = None):
        return call(self.port, method, path, body, headers, host)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def assert_openai_error(status: int, reply, expected: int, *words: str) -> None:
    assert status == expected, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert all(w in reply["error"]["message"] for w in words), reply


# --- item 2: cross-site requests ------------------------------------------------------------------------
def test_the_host_names_answered_follow_the_bound_address():
    loopback = {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts("127.0.0.1") == loopback
    assert allowed_hosts("localhost", ["My.Box:8000"]) == loopback | {"my.box"}
    assert allowed_hosts("::1") == loopback
    assert allowed_hosts("0.0.0.0") is None  # bound for the network, without --allow-host: any name
    assert allowed_hosts("192.168.1.5") is None
    assert allowed_hosts("0.0.0.0", ["my.box"]) == loopback | {"my.box"}
    assert allowed_hosts("192.168.1.5", ["my.box"]) == loopback | {"my.box", "192.168.1.5"}


def test_a_server_bound_elsewhere_answers_any_host_unless_names_are_given():
    model, tok = tiny_model(50257), get_tokenizer("gpt2")
    for allowed, evil in ((allowed_hosts("0.0.0.0"), 200), (allowed_hosts("0.0.0.0", ["my.box"]), 403)):
        app = LiveApp(model, tok, Settings("tiny", allowed_hosts=allowed))
        try:
            status, _, reply = app.call("POST", "/v1/completions", GOOD, host="evil.example")
            assert status == evil, reply
            assert app.call("POST", "/v1/completions", GOOD, host="my.box:80")[0] == 200
        finally:
            app.close()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("security") / "tiny"
    save_checkpoint(path, tiny_model(50257), get_tokenizer("gpt2"))
    return path


def test_a_loopback_server_refuses_foreign_hosts_cross_site_bodies_and_preflights(tiny_ckpt):
    server = Server("--checkpoint", tiny_ckpt, "--allow-host", "my.box", "--name", "tiny")
    port = server.port
    try:
        here = f"127.0.0.1:{port}"
        # the playground and /health, from a browser at http://127.0.0.1:PORT/ (or localhost, [::1], my.box)
        status, headers, page = call(port, "GET", "/", host=here)
        assert status == 200 and headers["content-type"].startswith("text/html") and "fetch(" in page
        for host in (here, f"localhost:{port}", f"[::1]:{port}", "localhost", f"my.box:{port}", "MY.BOX"):
            assert call(port, "GET", "/health", host=host)[0] == 200, host
        # a DNS-rebinding page: its own name now points here; neither reading nor writing works
        for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions")):
            status, headers, reply = call(port, method, path, GOOD if method == "POST" else None, JSON,
                                          host=f"attacker.example:{port}")
            assert_openai_error(status, reply, 403, "attacker.example", "--allow-host")
            assert reply["error"]["code"] == "host_not_allowed"
        # bodies a page may send to another site without a preflight: refused
        body = json.dumps(GOOD).encode()
        for kind in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                     "multipart/form-data; boundary=x", None):
            status, _, reply = call(port, "POST", "/v1/completions", body, {"Content-Type": kind} if kind else {},
                                    host=here)
            assert_openai_error(status, reply, 415, "application/json")
        status, _, reply = call(port, "POST", "/v1/completions", body, {"Content-Type": "application/json; charset=utf-8"},
                                host=here)
        assert status == 200 and reply["choices"][0]["finish_reason"] == "length"
        # a cross-origin preflight: refused, and nothing says the origin may go on
        preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type"}
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/models"):
            status, headers, reply = call(port, "OPTIONS", path, None, preflight, host=here)
            assert_openai_error(status, reply, 403, "evil.example")
            assert not any(h.startswith("access-control-allow") for h in headers)
        assert call(port, "POST", "/v1/completions", GOOD, JSON, host=here)[0] == 200  # still serving
    finally:
        assert server.stop() == 0


# --- item 12: a 400, not a 500 ----------------------------------------------------------------------------
def nested(depth: int) -> bytes:
    return b'{"model": "tiny", "prompt": "hi", "max_tokens": 2, "x": ' + b"[" * depth + b"]" * depth + b"}"


def test_deep_json_bad_text_and_unknown_characters_are_400s_and_the_server_keeps_serving(tokenizer):
    """`tokenizer`: a trained byte-level BPE (Hugging Face tokenizers), as a fine-tune's base has."""
    def template(messages):
        return tokenizer.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:")

    gpt2 = LiveApp(tiny_model(50257), get_tokenizer("gpt2"), Settings("tiny"))
    bpe = LiveApp(tiny_model(tokenizer.vocab_size), tokenizer, Settings("tiny", chat_template=template))
    chars = LiveApp(tiny_model(CHARS.vocab_size), CHARS, Settings("tiny"))
    try:
        assert gpt2.call("POST", "/v1/completions", nested(60))[0] == 200  # deep enough for any real request
        chat = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "a \ud800"}]}
        bad = [
            (gpt2, "/v1/completions", nested(100_000), "64 levels"),  # Python's parser: RecursionError
            (gpt2, "/v1/completions", nested(65), "64 levels"),
            (gpt2, "/v1/completions", {**GOOD, "prompt": "hi \ud800 there"}, "U+D800"),
            (bpe, "/v1/completions", {**GOOD, "prompt": "hi \ud800 there"}, "U+D800"),
            (bpe, "/v1/completions", {**GOOD, "prompt": ["red", "\udfff"]}, "U+DFFF"),
            (bpe, "/v1/chat/completions", chat, "U+D800"),
            (chars, "/v1/completions", {**GOOD, "prompt": "abz"}, "'z'"),
        ]
        for app, path, body, words in bad:
            status, _, reply = app.call("POST", path, body)
            assert_openai_error(status, reply, 400, words)
            assert app.call("POST", "/v1/completions", {**GOOD, "prompt": "abc"})[0] == 200
        assert bpe.call("POST", "/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "a"}]})[0] == 200
    finally:
        for app in (gpt2, bpe, chars):
            app.close()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "build_llm.cli", *args], capture_output=True, text=True, timeout=600)


def assert_one_line(result: subprocess.CompletedProcess, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("build-llm"), result.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_a_port_in_use_is_one_line_and_exit_2(tiny_ckpt):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--checkpoint", str(tiny_ckpt), "--port", str(port))
    assert_one_line(result, f"port {port} is in use", "--port")


def test_max_batch_is_bounded_and_checked_against_memory(tmp_path, tiny_ckpt):
    assert_one_line(run_cli("serve", "--checkpoint", str(tiny_ckpt), "--max-batch", "1000000000"),
                    "--max-batch", "1000000000", "1024")
    # a model with a long context: 1024 rows of its KV cache need far more memory than this machine has
    model = tiny_model(CHARS.vocab_size, context_length=8192, emb_dim=512, n_heads=2, n_layers=2)
    need, free = kv_cache_bytes(model.cfg, 1024), available_memory()
    if free is None or need < 2 * free:
        pytest.skip(f"the test needs a machine with less than {need / 2**31:.0f} GiB available")
    save_checkpoint(tmp_path / "long", model, CHARS)
    del model
    assert_one_line(run_cli("serve", "--checkpoint", str(tmp_path / "long"), "--max-batch", "1024"),
                    "--max-batch 1024", "GiB", "available")
