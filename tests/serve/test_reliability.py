"""`build-llm serve` keeps serving everyone when one request is bad (issue 20, items 8-11): a row that
fails fails alone, values the model cannot use are refused up front, the stop-string scan and prompt
counting cost no more than the text they read, and a client that goes away frees its rows."""

from __future__ import annotations

import json
import math
import random
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from build_llm.data.tokenizer import CharTokenizer, get_tokenizer
from build_llm.errors import UsageError
from build_llm.infer.generate import MIN_TEMPERATURE, check_temperature, generate
from build_llm.serve import Settings
from build_llm.serve.engine import Engine, QueueFull, Sequence, Token
from build_llm.serve.protocol import ApiError, Choice, parse_sampling
from build_llm.store.checkpoint import load_checkpoint, save_checkpoint
from test_security import LiveApp
from test_serve import Collect, post, tiny_model
from tiny import Server

BAD_VALUES = {"temperature": 1e-46, "logprobs": 20}  # 0 in float32; more alternatives than 5 tokens


# --- the engine: a row that fails fails alone -----------------------------------------------------------
@pytest.mark.parametrize("echo", [False, True])
def test_a_failing_row_fails_alone_and_the_others_finish(echo):
    """Token 3's embedding is NaN (untied head): a sampled row holding it cannot draw a token. It gets
    the error; the rows decoding beside it get what they get alone. With echo it used to be dropped:
    neither errored nor finished, its client waiting for ever."""
    model = tiny_model(vocab_size=300, tie_weights=False)
    with torch.no_grad():
        model.tok_emb.weight[3] = float("nan")
    engine = Engine(model, max_batch=4, max_queue=16).start()
    try:
        prompts = [[5, 6, 7], [10, 11], [12, 13, 14, 15]]
        goods = [Collect() for _ in prompts]
        bad = Collect()
        engine.submit([Sequence(prompts[0], 12, goods[0])])
        while not goods[0].tokens:  # a row already decoding when the bad one arrives
            time.sleep(0.001)
        engine.submit([Sequence([3, 1, 2], 12, bad, temperature=1.0, seed=0, echo=echo, logprobs=2 if echo else None)]
                      + [Sequence(p, 12, o) for p, o in zip(prompts[1:], goods[1:])])
        assert bad.done.wait(30), "the failing row never answered"
        assert "NaN" in bad.reason
        for p, o in zip(prompts, goods):
            assert o.done.wait(30) and o.reason == "length"
            assert o.tokens == generate(model, torch.tensor([p]), 12)[0, len(p):].tolist()
        after = Collect()
        engine.submit([Sequence([5, 6, 7], 4, after)])  # the engine goes on serving
        assert after.done.wait(30) and after.tokens == goods[0].tokens[:4]
        assert engine.load["active"] == 0
    finally:
        engine.stop()


@pytest.mark.parametrize("echo", [False, True])
def test_values_the_engine_cannot_use_as_given_do_not_break_it(echo):
    """A temperature that is 0 in float32 samples greedily; logprobs beyond the vocabulary report all of it."""
    model = tiny_model(vocab_size=5)
    engine = Engine(model, max_batch=2, max_queue=4).start()
    try:
        out, tops = Collect(), []
        emit = lambda kind, payload: (tops.append(payload.top) if kind == "token" else None, out(kind, payload))
        engine.submit([Sequence([1, 2, 3], 6, emit, echo=echo, **BAD_VALUES)])
        assert out.done.wait(30) and out.reason == "length"
        assert out.tokens == generate(model, torch.tensor([[1, 2, 3]]), 6)[0, 3:].tolist()
        assert all(len(t) == 5 for t in tops)
    finally:
        engine.stop()


# --- the stop-string scan ----------------------------------------------------------------------------------
def stopped(full: str, stops: list[str]) -> tuple[str, bool]:
    """The plain definition: the text up to the first stop string, and whether there was one."""
    hits = [full.find(s) for s in stops if s in full]
    return (full[:min(hits)], True) if hits else (full, False)


def held(full: str, stops: list[str]) -> int:
    """The plain definition: the longest end of `full` that begins a stop string."""
    return max([k for s in stops for k in range(1, min(len(s), len(full) + 1)) if full.endswith(s[:k])], default=0)


def test_the_stop_scan_agrees_with_the_plain_definition():
    tok = CharTokenizer.from_text("ab")
    rng = random.Random(0)
    for trial in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        ids = [rng.randint(1, 2) for _ in range(rng.randint(1, 40))]
        c = Choice(0, tok, stops, False, None)
        for n, i in enumerate(ids, 1):
            c.on_token(Token(i))
            full = tok.decode(ids[:n])
            want, hit = stopped(full, stops)
            if hit:
                assert c.finish == "stop" and c.text == want, (stops, full)
                break
            assert c.finish is None and c.text == full[:len(full) - held(full, stops)], (stops, full)


def test_the_stop_scan_waits_for_whole_characters():
    tok = get_tokenizer("gpt2")
    text = "Grüße 😀 aus Köln 😀 und Bonn"
    c = Choice(0, tok, ["😀 und"], False, None)
    for i in tok.encode(text):
        c.on_token(Token(i))
    assert c.finish == "stop" and c.text == "Grüße 😀 aus Köln "


def test_long_stop_strings_cost_time_in_proportion_to_the_text():
    """Four 40,000-character stop strings over a 900-token completion: the scan used to be cubic in the
    text's length (61 s for 8 such rows); now each new character is read once."""
    tok = get_tokenizer("gpt2")
    ids = tok.encode(" ".join(f"word{i % 97} and more" for i in range(400)))[:900]
    full = tok.decode(ids)
    stops = [full[:3000] + "\x00" * 37000, "and" * 13334, full[100:2100] + "!" * 38000, "z" * 40000]
    c = Choice(0, tok, stops, False, None)
    start = time.perf_counter()
    for i in ids:
        c.on_token(Token(i))
    assert time.perf_counter() - start < 2.0
    assert c.finish is None and c.text == full[:len(full) - held(full, stops)]


def test_the_server_and_the_library_share_one_temperature_rule():
    """A temperature is refused by the server iff the library refuses it, in the same words; the smallest
    float32 above 0 is accepted (the server used to refuse anything below float32's smallest normal, 1.2e-38)
    and samples the argmax without a NaN."""
    settings = Settings("tiny")
    smallest = math.nextafter(MIN_TEMPERATURE, 1.0)  # 2**-149
    assert parse_sampling({"temperature": smallest}, settings, 64).temperature == smallest
    s = Sequence([1], 1, lambda *a: None, temperature=smallest)
    assert Engine.sample(torch.tensor([1.0, 5.0, 3.0, 2.0]), s) == 1
    for t in (MIN_TEMPERATURE, 1e-46):
        with pytest.raises(UsageError) as library:
            check_temperature(t)
        with pytest.raises(ApiError) as server:
            parse_sampling({"temperature": t}, settings, 64)
        assert server.value.message == str(library.value) and server.value.param == "temperature"
        assert "is too small" in server.value.message


# --- the server, under a mixed batch ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def abc_server(tmp_path_factory):
    """The ABC demo's shape: a character model with 5 tokens (<PAD>, newline, A, B, C)."""
    path = tmp_path_factory.mktemp("reliability") / "abc"
    save_checkpoint(path, tiny_model(vocab_size=5), CharTokenizer.from_text("ABC\n"))
    s = Server("--checkpoint", path, "--max-batch", "8", "--max-queue", "64")
    yield s, path
    s.stop()


@pytest.fixture(scope="module")
def bpe_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("reliability") / "bpe"
    save_checkpoint(path, tiny_model(context_length=1024), get_tokenizer("gpt2"))
    s = Server("--checkpoint", path, "--max-batch", "8", "--max-queue", "64")
    yield s, path
    s.stop()


def reference(ckpt: Path, prompt: str, n: int) -> str:
    c = load_checkpoint(ckpt)
    ids = c.tokenizer.encode(prompt)
    return c.tokenizer.decode(generate(c.model, torch.tensor([ids]), n)[0, len(ids):].tolist())


class HealthWatch:
    """GET /health on each server every 0.2 s; the slowest answer (or an error) is kept."""

    def __init__(self, *urls: str) -> None:
        self.urls, self.slowest, self.errors = urls, 0.0, []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stopping.wait(0.2):
            for url in self.urls:
                start = time.perf_counter()
                try:
                    with urllib.request.urlopen(url + "/health", timeout=30) as r:
                        r.read()
                except OSError as e:
                    self.errors.append(repr(e))
                self.slowest = max(self.slowest, time.perf_counter() - start)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(60)


def test_a_mixed_batch_answers_every_good_request_and_refuses_every_bad_one(abc_server, bpe_server):
    (abc, abc_ckpt), (bpe, bpe_ckpt) = abc_server, bpe_server
    abc_text = reference(abc_ckpt, "ABCA", 20)
    bpe_text = reference(bpe_ckpt, "Once upon a time", 900)
    good_abc = {"model": "abc", "prompt": "ABCA", "max_tokens": 20, "temperature": 0}
    good_bpe = {"model": "bpe", "prompt": "Once upon a time", "max_tokens": 900, "temperature": 0, "n": 8,
                "stop": ["A" * 40000, "B" * 40000, bpe_text[:400] + "\x00" * 39600, "z" * 40000]}
    goods = [(abc, good_abc, [abc_text]), (abc, {**good_abc, "echo": True, "logprobs": 3}, ["ABCA" + abc_text]),
             (bpe, good_bpe, [bpe_text] * 8)]
    bads = [(abc, {**good_abc, key: value, **echo}) for key, value in BAD_VALUES.items()  # items 8 and 9
            for echo in ({}, {"echo": True})]
    bads += [(abc, {**good_abc, "prompt": "ABC xyz"}),  # item 12: characters the model does not know
             (abc, b'{"model": "abc", "prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}"),  # item 12: nested
             (bpe, {**good_bpe, "prompt": "\ud800", "max_tokens": 2}),  # item 12: a lone surrogate on BPE
             (bpe, {"model": "bpe", "prompt": ["a"] * 170000, "max_tokens": 1})]  # item 10: counted first
    watch = HealthWatch(abc.url, bpe.url)
    try:
        with ThreadPoolExecutor(len(goods) + len(bads)) as pool:
            good_replies = [pool.submit(post, s.url, body, key=None) for s, body, _ in goods]
            bad_replies = [pool.submit(post, s.url, body, key=None) for s, body in bads]
            for (_, body, texts), reply in zip(goods, good_replies):
                code, answer = reply.result(600)
                assert code == 200, answer
                assert [c["text"] for c in answer["choices"]] == texts
            for (_, body), reply in zip(bads, bad_replies):
                code, answer = reply.result(600)
                assert 400 <= code < 500 and answer["error"]["message"], (str(body)[:80], code, answer)
    finally:
        watch.stop()
    print(f"the slowest /health answer: {watch.slowest:.3f} s")
    assert not watch.errors and watch.slowest < 1.0, (watch.slowest, watch.errors[:3])


def test_a_bad_request_is_refused_with_a_clear_reason(abc_server):
    s, _ = abc_server
    good = {"model": "abc", "prompt": "ABCA", "max_tokens": 4, "temperature": 0}
    code, reply = post(s.url, {**good, "temperature": 1e-46, "echo": True}, key=None)
    assert code == 400 and reply["error"]["param"] == "temperature" and "expected 0" in reply["error"]["message"]
    code, reply = post(s.url, {**good, "logprobs": 20, "echo": True}, key=None)
    assert code == 400 and reply["error"]["param"] == "logprobs" and "[0, 5]" in reply["error"]["message"]


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        return json.loads(r.read())


def test_a_dropped_client_of_a_whole_reply_frees_its_rows(bpe_server):
    s, _ = bpe_server
    body = json.dumps({"model": "bpe", "prompt": "a", "max_tokens": 900, "n": 8, "temperature": 0}).encode()
    before = health(s.url)["steps"]
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.time() + 60
        while health(s.url)["active"] < 8 and time.time() < deadline:
            time.sleep(0.05)
    deadline = time.time() + 60  # the socket is closed: the rows leave the batch
    while health(s.url)["active"] and time.time() < deadline:
        time.sleep(0.05)
    now = health(s.url)
    assert now["active"] == 0 and now["steps"] - before < 600, now


def test_a_dropped_client_of_a_stream_frees_its_rows(bpe_server):
    """As above, for a stream: its 8 rows leave the batch long before their 900 tokens are decoded for nobody."""
    s, _ = bpe_server
    body = json.dumps({"model": "bpe", "prompt": "a", "max_tokens": 900, "n": 8, "temperature": 0,
                       "stream": True}).encode()
    before = health(s.url)["steps"]
    with socket.create_connection(("127.0.0.1", s.port), timeout=30) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        with conn.makefile("rb") as reader:  # (closed first: while it is open, the socket stays open)
            while not reader.readline().startswith(b"data: {"):  # decoding: the first token is here
                pass
    deadline = time.time() + 60
    while health(s.url)["active"] and time.time() < deadline:
        time.sleep(0.05)
    now = health(s.url)
    assert now["active"] == 0 and now["steps"] - before < 600, now


def test_requests_the_shutdown_timeout_cuts_short_get_a_503_or_a_last_error_event_and_no_traceback(tmp_path):
    """Past --shutdown-timeout after SIGTERM, uvicorn cancels what is left: the stream used to be cut (its client read
    a broken chunked body), a waiting request got a plain-text 500, and each printed a traceback."""
    path = tmp_path / "slow"
    save_checkpoint(path, tiny_model(context_length=2048, emb_dim=256, n_layers=4), get_tokenizer("gpt2"))
    s = Server("--checkpoint", path, "--max-batch", "1", "--shutdown-timeout", "1")
    long = {"model": "slow", "prompt": "go", "max_tokens": 2000, "temperature": 0}  # seconds of decoding, at least
    try:
        req = urllib.request.Request(s.url + "/v1/completions", data=json.dumps({**long, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        stream = urllib.request.urlopen(req, timeout=300)
        assert stream.readline().startswith(b"data: ")  # decoding: the one row is busy
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(post_raw, s.url, long)
            deadline = time.time() + 120
            while health(s.url)["waiting"] != 1:
                assert time.time() < deadline
                time.sleep(0.05)
            s.proc.send_signal(signal.SIGTERM)
            events = [json.loads(line[6:]) for line in stream.read().decode().splitlines() if line.startswith("data: {")]
            assert events[-1]["error"]["code"] == "server_shutting_down", events[-1]
            status, headers, reply = waiting.result(120)
        assert status == 503 and reply["error"]["code"] == "server_shutting_down" and headers["Retry-After"] == "1"
        assert s.proc.wait(120) == 0
        assert "Traceback" not in s.output(), s.output()
    finally:
        s.stop()


def test_ctrl_c_lets_the_stream_in_flight_finish_then_exits_130_in_one_line(tmp_path):
    """SIGINT (Ctrl-C) shuts down as SIGTERM does, and ends as an interrupted command does (exit 130)."""
    path = tmp_path / "tiny"
    save_checkpoint(path, tiny_model(context_length=256), get_tokenizer("gpt2"))
    s = Server("--checkpoint", path, "--max-batch", "1")
    try:
        body = {"model": "tiny", "prompt": "go", "max_tokens": 200, "temperature": 0, "stream": True}
        req = urllib.request.Request(s.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        stream = urllib.request.urlopen(req, timeout=300)
        assert stream.readline().startswith(b"data: ")
        s.proc.send_signal(signal.SIGINT)
        events = [json.loads(line[6:]) for line in stream.read().decode().splitlines() if line.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert s.proc.wait(120) == 130
        assert "Traceback" not in s.output() and s.output().strip().endswith("build-llm: interrupted"), s.output()
    finally:
        s.stop()


def post_raw(url: str, body: dict) -> tuple[int, Any, dict]:
    """(status, headers (case-insensitive), JSON) of a POST to /v1/completions, whatever its status."""
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def test_sigterm_after_bad_echo_requests_ends_at_once_and_quietly(abc_server):
    """The bad values with echo used to leave their requests unanswered; SIGTERM then waited the whole
    shutdown timeout and printed about 40 lines of traceback. (Last in this file: it stops the server.)"""
    s, _ = abc_server
    good = {"model": "abc", "prompt": "ABCA", "max_tokens": 4, "temperature": 0, "echo": True}
    with ThreadPoolExecutor(len(BAD_VALUES)) as pool:
        replies = [pool.submit(post, s.url, {**good, key: value}, key=None) for key, value in BAD_VALUES.items()]
        assert [r.result(120)[0] for r in replies] == [400] * len(BAD_VALUES)
    start = time.time()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(60) == 0 and time.time() - start < 10
    assert "Traceback" not in s.output()


# --- a full queue, and the clients that leave it ----------------------------------------------------------------
def test_a_cancelled_waiting_sequence_gives_up_its_place_in_the_queue():
    engine = Engine(tiny_model(vocab_size=300), max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    left, stays = Collect(), Collect()
    gone = Sequence([1], 3, left)
    engine.submit([gone, Sequence([1], 3, stays)])
    gone.cancel()  # its client went away while it waited
    assert engine.load["waiting"] == 1
    engine.submit([Sequence([2], 3, Collect())])  # the place is free again
    assert left.reason == "cancelled" and stays.reason is None  # told, as the engine tells what it pops
    with pytest.raises(QueueFull):
        engine.submit([Sequence([1], 1, Collect())])


def test_more_choices_than_the_queue_holds_is_a_400_not_a_503_to_retry_forever():
    tok = get_tokenizer("gpt2")
    model = tiny_model()
    app = LiveApp(model, tok, Settings("tiny", chat_template=lambda messages: tok.encode(messages[-1]["content"])),
                  Engine(model, max_batch=1, max_queue=2))
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 3}
    try:
        for path, body in (("/v1/chat/completions", chat), ("/v1/completions", {**chat, "prompt": "hi"}),
                           ("/v1/completions", {**chat, "prompt": ["a", "b"], "n": 2})):
            status, headers, reply = app.call("POST", path, body)
            assert status == 400 and reply["error"]["param"] == "n" and "retry-after" not in headers, reply
            assert "2 sequences" in reply["error"]["message"]
        assert app.call("POST", "/v1/chat/completions", {**chat, "n": 2})[0] == 200
    finally:
        app.close()


class Paused(Engine):
    """An engine whose thread decodes nothing until `go` is set: what it is given stays in its queue."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.go = threading.Event()

    def step(self) -> None:
        self.go.wait()
        super().step()


def open_stream(port: int, body: dict) -> socket.socket:
    """A streaming completion sent on a raw connection (closing it is a client going away)."""
    data = json.dumps(body).encode()
    conn = socket.create_connection(("127.0.0.1", port), timeout=60)
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return conn


def test_a_full_queue_is_a_503_with_retry_after_and_clients_that_leave_it_free_their_places():
    model = tiny_model()
    engine = Paused(model, max_batch=1, max_queue=2)
    app = LiveApp(model, get_tokenizer("gpt2"), Settings("tiny"), engine)
    stream = {"model": "tiny", "prompt": [1, 2], "max_tokens": 3, "temperature": 0, "stream": True}

    def waiting(count: int) -> None:
        deadline = time.time() + 60
        while app.call("GET", "/health")[2]["waiting"] != count:
            assert time.time() < deadline, app.call("GET", "/health")[2]
            time.sleep(0.02)
    try:
        leaving = [open_stream(app.port, stream) for _ in range(2)]
        waiting(2)
        status, headers, reply = app.call("POST", "/v1/completions", {**stream, "stream": False})
        assert status == 503 and reply["error"]["code"] == "server_overloaded", reply
        assert int(headers["retry-after"]) >= 1  # the openai client waits that long before it retries
        for conn in leaving:  # gone before their turn: they must not keep others out
            conn.close()
        waiting(0)
        staying = open_stream(app.port, stream)
        waiting(1)
        engine.go.set()
        reply = staying.makefile("rb").read().decode()
        staying.close()
        assert reply.startswith("HTTP/1.1 200") and '"finish_reason": "length"' in reply and "data: [DONE]" in reply
    finally:
        engine.go.set()
        app.close()


# --- OpenAI parameters the server does not implement: refused, not ignored ------------------------------------
@pytest.mark.parametrize("key, value", [("logit_bias", {"50256": -100}), ("presence_penalty", 1.5),
                                        ("frequency_penalty", -0.5), ("best_of", 3), ("suffix", " the end"),
                                        ("response_format", {"type": "json_object"})])
def test_a_parameter_the_server_does_not_implement_is_refused_unless_it_asks_for_nothing(key, value):
    settings = Settings("tiny")
    with pytest.raises(ApiError) as refused:
        parse_sampling({key: value}, settings, 64)
    assert refused.value.status == 400 and refused.value.param == key and "not supported" in refused.value.message
    neutral = {"logit_bias": {}, "presence_penalty": 0.0, "frequency_penalty": 0, "best_of": 1, "suffix": "",
               "response_format": {"type": "text"}}[key]  # what clients send when their user set nothing
    assert parse_sampling({key: neutral}, settings, 64) == parse_sampling({}, settings, 64)


def test_chat_refuses_logprobs_and_echo_by_name():
    tok = get_tokenizer("gpt2")
    app = LiveApp(tiny_model(), tok, Settings("tiny", chat_template=lambda messages: tok.encode(messages[-1]["content"])))
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    try:
        for key, value in (("logprobs", True), ("logprobs", 0), ("top_logprobs", 2), ("echo", True)):
            status, _, reply = app.call("POST", "/v1/chat/completions", {**chat, key: value})
            assert status == 400 and reply["error"]["param"] == key, reply
            assert "/v1/completions only" in reply["error"]["message"], reply
        for key in ("logprobs", "echo"):
            assert app.call("POST", "/v1/chat/completions", {**chat, key: False})[0] == 200
    finally:
        app.close()


# --- a padded embedding: ids past the tokenizer's are no text ----------------------------------------------------
def test_a_model_with_more_ids_than_its_tokenizer_never_produces_or_takes_the_extra_ones():
    """Qwen's embeddings have rows past its tokenizer's ids (padding). Made here to be the most likely tokens, they
    used to be drawn, and decoding them failed the request with a 500 (a stream broke off)."""
    tok = get_tokenizer("gpt2")  # 50,257 ids
    model = tiny_model(vocab_size=50304)
    with torch.no_grad():
        model.final_norm.scale.zero_()
        model.final_norm.shift.fill_(1.0)  # every position's last hidden state: all ones
        model.out_head.weight[tok.vocab_size:] = 1.0  # so the padding's logits are the largest
    real = model.out_head.weight[:tok.vocab_size].sum(1)  # the logits of the tokenizer's ids, at every position
    expected = tok.decode([int(real.argmax())] * 3)
    app = LiveApp(model, tok, Settings("tiny"))
    good = {"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0}
    try:
        for body in (good, {**good, "echo": True, "logprobs": 5}, {**good, "temperature": 1.0, "top_k": 50, "seed": 1}):
            status, _, reply = app.call("POST", "/v1/completions", body)
            assert status == 200, reply
            choice = reply["choices"][0]
            if body.get("temperature") == 0:
                assert choice["text"] == ("hi" if body.get("echo") else "") + expected
            if body.get("logprobs"):  # the alternatives are the tokenizer's ids too
                assert len(choice["logprobs"]["top_logprobs"]) == 1 + 3 and choice["logprobs"]["top_logprobs"][1]
        status, _, reply = app.call("POST", "/v1/completions", {**good, "prompt": [50300]})
        assert status == 400 and "[0, 50257)" in reply["error"]["message"], reply
        status, _, stream = app.call("POST", "/v1/completions", {**good, "stream": True})
        assert status == 200 and stream.rstrip().endswith("data: [DONE]"), stream
    finally:
        app.close()
