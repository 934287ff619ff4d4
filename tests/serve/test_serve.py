"""`build-llm serve`: the batching engine, and the real server driven by the official `openai` client
and by raw HTTP (malformed requests, disconnects, limits, SIGTERM)."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import uvicorn

from build_llm import GPTConfig, GPTModel
from build_llm.data.tokenizer import get_tokenizer
from build_llm.infer.generate import generate
from build_llm.infer.quant import prepare_for_decoding
from build_llm.interop.hf import to_hf
from build_llm.serve import Settings, create_app
from build_llm.serve.app import Outbox
from build_llm.serve.engine import Engine, QueueFull, Sequence
from build_llm.store.checkpoint import load_checkpoint, save_checkpoint
from tiny import Server, free_port, tiny_cfg, words_tokenizer, write_instruct_json

openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e '.[test]')")

KEY = "test-key"


def tiny_model(seed: int = 0, **kw) -> GPTModel:
    torch.manual_seed(seed)
    cfg = dict(context_length=64, emb_dim=32, n_heads=4, n_layers=2)
    return GPTModel(GPTConfig.from_preset("gpt2-small", **{**cfg, **kw})).eval()


# --- the engine, in-process -------------------------------------------------------------------------
class Collect:
    def __init__(self) -> None:
        self.tokens, self.reason, self.done = [], None, threading.Event()

    def __call__(self, kind, payload) -> None:
        if kind == "token":
            self.tokens.append(payload.id)
        elif kind in ("done", "error"):
            self.reason = payload
            self.done.set()


# Gemma 3's options: grouped-query attention, a 4-token window on local layers, (1 + w) norms, ...
GEMMA_LIKE = dict(pos_emb="rope", norm="rmsnorm", mlp="geglu", bias=False, qkv_bias=False, qk_norm=True, n_kv_heads=2,
                  head_size=16, sliding_window=4, layer_types=("sliding", "full"), rope_local_base=100.0,
                  norm_plus_one=True, scale_emb=True, post_norms=True, attn_scale=0.3, fused_qkv=False)


# Llama's options with 3:1 grouped key/value heads (SmolLM2's ratio)
LLAMA_LIKE = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=False, fused_qkv=False,
                  n_heads=6, n_kv_heads=2, emb_dim=48)


# int8: rows decoded by the compiled step (quant.py); a Gemma-like model: by the modules, rows at their own positions
@pytest.mark.parametrize("dtype, kw", [("float32", {}), ("int8", {}), ("float32", GEMMA_LIKE), ("int8", LLAMA_LIKE)])
def test_batched_greedy_decoding_gives_each_request_what_it_gets_alone(dtype, kw):
    model = prepare_for_decoding(tiny_model(vocab_size=300, **kw), dtype)
    engine = Engine(model, max_batch=3, max_queue=16).start()
    try:
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (1, 5, 9, 3, 12, 7)]
        outs = [Collect() for _ in prompts]
        seqs = [Sequence(p, 10 + i, outs[i]) for i, p in enumerate(prompts)]
        engine.submit(seqs[:2])
        time.sleep(0.05)
        engine.submit(seqs[2:])  # these join a batch already running, at a step boundary
        for o in outs:
            assert o.done.wait(60)
        for i, p in enumerate(prompts):
            alone = generate(model, torch.tensor([p]), 10 + i)[0, len(p):].tolist()
            assert outs[i].tokens == alone and outs[i].reason == "length"
        # 75 tokens in fewer steps than tokens: rows really were decoded together
        assert engine.steps < sum(10 + i for i in range(6)) - 10
    finally:
        engine.stop()


def decode_together(model, prompts, lengths, max_batch):
    """Every prompt submitted at once to a fresh engine; (the tokens of each, the engine once stopped)."""
    engine = Engine(model, max_batch=max_batch, max_queue=16)
    outs = [Collect() for _ in prompts]
    engine.submit([Sequence(p, n, o) for p, n, o in zip(prompts, lengths, outs)])  # queued before the thread starts
    engine.start()
    try:
        for o in outs:
            assert o.done.wait(60) and o.reason == "length"
    finally:
        engine.stop()
    return [o.tokens for o in outs], engine


def test_rows_finishing_together_leave_without_moving_any_cache_row():
    """A finished row's slot takes the last active row (its keys and values copied); rows that finish at the end of
    the batch simply go, so a batch of requests of one length ends with no copy, and a row finishing early costs
    one copy, after which the moved row still gets what it gets alone."""
    model = prepare_for_decoding(tiny_model(vocab_size=300), "int8")
    prompts = [[3, 1, 4], [1, 5], [9, 2, 6, 5], [3, 5, 8, 9, 7]]
    alone = lambda p, n: generate(model, torch.tensor([p]), n)[0, len(p):].tolist()  # noqa: E731
    tokens, engine = decode_together(model, prompts, [6] * 4, max_batch=4)
    assert engine.copies == 0 and tokens == [alone(p, 6) for p in prompts]
    lengths = [2, 9, 9, 12]  # row 0 leaves first: row 3 moves into its slot (1 copy); then 1 and 2, then 0 (was 3)
    tokens, engine = decode_together(model, prompts, lengths, max_batch=4)
    assert engine.copies == 1 and tokens == [alone(p, n) for p, n in zip(prompts, lengths)]


def test_each_batch_size_chooses_its_own_thread_count():
    """A step's thread count is chosen by timing steps (runtime.decoding_threads): a batch of 3 rows is never timed
    against a step of 1 row, which takes a fraction of its time on any count."""
    model = prepare_for_decoding(tiny_model(vocab_size=300), "int8")
    _, engine = decode_together(model, [[1, 2, 3]], [4], max_batch=3)
    assert set(engine.step_threads) == {1}
    _, engine = decode_together(model, [[1, 2, 3], [4, 5], [6]], [4, 4, 4], max_batch=3)
    assert set(engine.step_threads) == {3}


def test_outbox_wakes_the_loop_once_for_the_reports_of_a_step_and_keeps_each_queue_in_order():
    loop = asyncio.new_event_loop()
    try:
        outbox = Outbox(loop)
        a, b = asyncio.Queue(), asyncio.Queue()
        poster = threading.Thread(target=lambda: [outbox.post(a if i % 2 else b, (i,)) for i in range(16)])
        poster.start()
        poster.join()  # 16 reports, posted while the loop was not running
        assert outbox.wakeups == 1
        loop.run_until_complete(asyncio.sleep(0))
        got = lambda q: [q.get_nowait() for _ in range(q.qsize())]  # noqa: E731
        assert got(a) == [(i,) for i in range(1, 16, 2)] and got(b) == [(i,) for i in range(0, 16, 2)]
        # after a delivery, the next report (posted while the loop runs) wakes the loop again
        async def post_next() -> None:
            await loop.run_in_executor(None, outbox.post, a, ("next",))
        loop.run_until_complete(post_next())
        assert outbox.wakeups == 2
        loop.run_until_complete(asyncio.sleep(0))
        assert a.get_nowait() == ("next",)
    finally:
        loop.close()
    with pytest.raises(RuntimeError):  # a closed loop: the engine hears it (and fails that sequence alone)
        outbox.post(a, ("late",))


def test_outbox_refuses_reports_once_its_loop_has_stopped_and_keeps_none():
    """At shutdown the loop stops before the engine: a report then has no reader. It must fail (the engine drops
    that sequence) rather than pile up, with every later one, behind a wake-up that never runs."""
    loop = asyncio.new_event_loop()
    try:
        outbox = Outbox(loop)
        queue = asyncio.Queue()

        async def serve_one() -> None:  # the app makes its Outbox, and posts, while the loop runs
            await loop.run_in_executor(None, outbox.post, queue, ("served",))
            await asyncio.sleep(0)
        loop.run_until_complete(serve_one())
        assert queue.get_nowait() == ("served",)
        for i in range(3):  # the loop has stopped (not closed): each report is refused, none is kept
            with pytest.raises(RuntimeError, match="stopped"):
                outbox.post(queue, ("late", i))
        assert outbox.items == [] and queue.empty()
        running = Outbox(asyncio.new_event_loop())  # an Outbox made before its loop runs: reports wait for it
        running.post(queue, ("early",))
        assert running.items == [(queue, ("early",))]
        running.loop.close()
    finally:
        loop.close()


def test_engine_cache_holds_only_the_key_value_heads():
    grouped = Engine(tiny_model(**LLAMA_LIKE), max_batch=4)
    multi = Engine(tiny_model(**{**LLAMA_LIKE, "n_kv_heads": None}), max_batch=4)  # same size, one K/V per head
    nbytes = lambda e: e.cache.k.nbytes + e.cache.v.nbytes  # noqa: E731
    # 2 layers x 4 slots x 64 positions x 8 channels a head x 4 bytes, keys and values: 2 heads, 6 heads
    assert nbytes(grouped) == 2 * 2 * 4 * 2 * 64 * 8 * 4 and nbytes(multi) == 2 * 2 * 4 * 6 * 64 * 8 * 4
    assert nbytes(grouped) * 3 == nbytes(multi)


def test_engine_sampling_draws_from_the_tempered_filtered_distribution():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.double)
    n = 20000
    for kw, expected in (({"temperature": 1.0, "top_k": 2}, torch.tensor([0, 0, 3 / 7, 4 / 7], dtype=torch.double)),
                         ({"temperature": 2.0}, p.sqrt() / p.sqrt().sum())):
        s = Sequence([1], 1, lambda *a: None, **kw)
        s.generator = torch.Generator().manual_seed(0)
        draws = torch.tensor([Engine.sample(p.log().float(), s) for _ in range(n)])
        freq = torch.bincount(draws, minlength=4).double() / n
        assert torch.all((freq - expected).abs() <= 4 * math.sqrt(0.25 / n))
    s.generator = torch.Generator().manual_seed(3)
    first = [Engine.sample(p.log().float(), s) for _ in range(50)]
    s.generator = torch.Generator().manual_seed(3)
    assert [Engine.sample(p.log().float(), s) for _ in range(50)] == first  # a seeded row repeats its draws
    tiny_t = Sequence([1], 1, lambda *a: None, temperature=1e-30)  # no overflow to NaN: the argmax
    assert Engine.sample(torch.tensor([1.0, 5.0, 3.0, 2.0]), tiny_t) == 1
    with pytest.raises(ValueError, match="NaN"):
        Engine.sample(torch.tensor([1.0, float("nan"), 3.0, 2.0]), s)


def test_engine_queue_limit_cancel_and_context_check():
    model = tiny_model(vocab_size=300)
    engine = Engine(model, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    engine.submit([Sequence([1, 2], 3, Collect()), Sequence([1], 3, Collect())])
    with pytest.raises(QueueFull):
        engine.submit([Sequence([1], 1, Collect())])
    with pytest.raises(ValueError, match="context of 64"):
        engine.submit([Sequence([1] * 60, 5, Collect())])
    engine.waiting.clear()
    engine.start()
    try:
        out = Collect()
        seq = Sequence([5, 6, 7], 50, out)
        engine.submit([seq])
        while not out.tokens:
            time.sleep(0.001)
        seq.cancel()
        assert out.done.wait(30) and out.reason == "cancelled" and len(out.tokens) < 50
        after = Collect()
        engine.submit([Sequence([5, 6, 7], 4, after)])  # the freed slot serves the next one
        assert after.done.wait(30) and after.tokens == generate(model, torch.tensor([[5, 6, 7]]), 4)[0, 3:].tolist()
    finally:
        engine.stop()


# --- the server ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "tiny"
    save_checkpoint(path, tiny_model(), get_tokenizer("gpt2"))
    return path


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    s = Server("--checkpoint", tiny_ckpt, "--api-key", KEY, "--max-batch", "4", "--max-queue", "16")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def reference(tiny_ckpt, prompt: str, n: int) -> str:
    ckpt = load_checkpoint(tiny_ckpt)
    ids = ckpt.tokenizer.encode(prompt)
    out = generate(ckpt.model, torch.tensor([ids]), n)[0, len(ids):].tolist()
    return ckpt.tokenizer.decode(out)


def test_openai_completions_greedy_equal_the_library(client, tiny_ckpt):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="The cat sat on", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.choices[0].text == reference(tiny_ckpt, "The cat sat on", 8)
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 8


def test_concurrent_requests_each_get_their_alone_output(client, tiny_ckpt):
    prompts = ["Once upon a time", "A", "The quick brown fox jumps over the lazy", "1 2 3 4", "Hello, world", "x y"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=12,
                                                                   temperature=0).choices[0].text, prompts))
    assert texts == [reference(tiny_ckpt, p, 12) for p in prompts]


def test_openai_streaming_gives_the_same_text(client):
    whole = client.completions.create(model="tiny", prompt="In the beginning", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="In the beginning", max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    counted = list(client.completions.create(model="tiny", prompt="In the beginning", max_tokens=10, temperature=0,
                                             stream=True, stream_options={"include_usage": True}))
    assert counted[-1].choices == [] and counted[-1].usage.completion_tokens == 10


def test_logprobs_with_echo_score_the_prompt_like_hugging_face(client, tiny_ckpt):
    ckpt = load_checkpoint(tiny_ckpt)
    ids = ckpt.tokenizer.encode("Paris is the capital of France")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=3, temperature=0)
    lp = r.choices[0].logprobs
    with torch.no_grad():
        ref = torch.log_softmax(to_hf(ckpt.model).eval()(torch.tensor([ids])).logits[0], -1)  # independent model code
    assert r.choices[0].text == "Paris is the capital of France" and lp.token_logprobs[0] is None
    expected = [ref[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert len(lp.tokens) == len(ids) and lp.text_offset[:2] == [0, len("Paris")]
    best = ref[0].topk(3)
    top = lp.top_logprobs[1]
    assert sorted(top.values(), reverse=True) == pytest.approx(best.values.tolist(), abs=1e-4)
    assert math.fsum(math.exp(v) for v in top.values()) < 1


def test_n_seed_stop_and_list_prompts(client):
    kw = dict(model="tiny", prompt="Roses are", n=2, seed=7, max_tokens=6, temperature=1.0, top_p=0.9,
              extra_body={"top_k": 20})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # the seed makes sampling repeatable
    assert [c.index for c in a.choices] == [0, 1]
    r = client.completions.create(model="tiny", prompt=["one", "two", "three"], max_tokens=3, temperature=0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    full = client.completions.create(model="tiny", prompt="Roses are", max_tokens=8, temperature=0).choices[0].text
    stop = full[3:5]
    cut = client.completions.create(model="tiny", prompt="Roses are", max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="Roses are", max_tokens=8, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.find(stop)]


def test_openai_errors(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length is 64"):
        client.completions.create(model="tiny", prompt="word " * 60, max_tokens=10)
    r = client.completions.create(model="tiny", prompt="word " * 60, max_tokens=10, temperature=0,
                                  extra_body={"truncate": True})
    assert r.usage.prompt_tokens == 54
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="hi", max_tokens=1)


def test_completions_without_max_tokens_get_what_the_context_leaves(client, tiny_ckpt):
    short = client.completions.create(model="tiny", prompt="The cat sat on", temperature=0)
    assert short.usage.completion_tokens == 60 and short.choices[0].text == reference(tiny_ckpt, "The cat sat on", 60)
    prompt = [1000] * 55  # 55 tokens: 9 are left in the 64-token window
    r = client.completions.create(model="tiny", prompt=prompt, temperature=0)
    assert r.usage.prompt_tokens == 55 and r.usage.completion_tokens == 9 and r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="no room is left"):  # the prompt alone fills the window
        client.completions.create(model="tiny", prompt="word " * 64)
    r = client.completions.create(model="tiny", prompt="word " * 64, temperature=0, extra_body={"truncate": True})
    assert r.usage.prompt_tokens == 32 and r.usage.completion_tokens == 32  # half the window for each


def test_chat_completions_with_a_template_through_the_openai_client(tiny_ckpt):
    """A model with a chat template (here a plain one given in-process), served by uvicorn in a thread."""
    ckpt = load_checkpoint(tiny_ckpt)
    tok = ckpt.tokenizer

    def template(messages):
        if messages[-1]["role"] != "user":
            raise ValueError("the last message must be the user's")
        return tok.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:")

    app = create_app(Engine(ckpt.model, max_batch=2, max_queue=4), tok, Settings("chatty", chat_template=template))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        chat = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
        r = chat.chat.completions.create(model="chatty", messages=messages, max_tokens=6, temperature=0)
        ids = template(messages)
        expected = tok.decode(generate(ckpt.model, torch.tensor([ids]), 6)[0, len(ids):].tolist())
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == expected and r.usage.prompt_tokens == len(ids)
        parts = list(chat.chat.completions.create(model="chatty", messages=messages, max_tokens=6, temperature=0,
                                                  stream=True))
        assert parts[0].choices[0].delta.role == "assistant"
        assert "".join(p.choices[0].delta.content or "" for p in parts) == expected
        assert parts[-1].choices[0].finish_reason == "length"
        # Without max_tokens, the reply may take what the context leaves after a long prompt (no 400);
        # an explicit max_tokens that does not fit is refused as before.
        long = [{"role": "user", "content": "Tell me more about " + "cats and dogs " * 12}]
        ids = template(long)
        assert 32 < len(ids) < 64  # more than the half of the window the old default (256 at most) left
        r = chat.chat.completions.create(model="chatty", messages=long, temperature=0)
        expected = generate(ckpt.model, torch.tensor([ids]), 64 - len(ids), eos_id=tok.eos_id)[0, len(ids):]
        assert r.usage.completion_tokens == 64 - len(ids) == len(expected) and r.choices[0].finish_reason == "length"
        assert r.choices[0].message.content == tok.decode(expected.tolist())
        with pytest.raises(openai.BadRequestError, match="maximum context length is 64"):
            chat.chat.completions.create(model="chatty", messages=long, max_tokens=64 - len(ids) + 1)
        with pytest.raises(openai.BadRequestError, match="ending with the user's message"):
            chat.chat.completions.create(model="chatty", messages=messages[:1] + [{"role": "assistant", "content": "x"}])
    finally:
        server.should_exit = True
        thread.join(30)


# 20+ malformed requests: each gets a 4xx JSON error in OpenAI's shape, and the server keeps serving.
GOOD = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
MALFORMED = [
    ("bad json", b'{"model": "tiny", "prompt": ', 400),
    ("not an object", b'[1, 2, 3]', 400),
    ("binary garbage", bytes(range(256)) * 4, 400),
    ("NaN literal", b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', 400),
    ("Infinity literal", b'{"model": "tiny", "prompt": "hi", "top_p": Infinity}', 400),
    ("empty body", b"", 400),
    ("no model", {"prompt": "hi"}, 400),
    ("unknown model", {**GOOD, "model": "gpt-4"}, 404),
    ("no prompt", {"model": "tiny"}, 400),
    ("prompt a number", {**GOOD, "prompt": 42}, 400),
    ("prompt empty list", {**GOOD, "prompt": []}, 400),
    ("prompt empty string", {**GOOD, "prompt": ""}, 400),
    ("token id out of range", {**GOOD, "prompt": [1, 2, 10**9]}, 400),
    ("max_tokens a string", {**GOOD, "max_tokens": "10"}, 400),
    ("max_tokens negative", {**GOOD, "max_tokens": -1}, 400),
    ("max_tokens huge", {**GOOD, "max_tokens": 10**12}, 400),
    ("max_tokens a float", {**GOOD, "max_tokens": 2.5}, 400),
    ("temperature negative", {**GOOD, "temperature": -0.5}, 400),
    ("temperature a string", {**GOOD, "temperature": "hot"}, 400),
    ("top_p zero", {**GOOD, "top_p": 0}, 400),
    ("top_p above one", {**GOOD, "top_p": 1.5}, 400),
    ("top_k negative", {**GOOD, "top_k": -5}, 400),
    ("n zero", {**GOOD, "n": 0}, 400),
    ("n huge", {**GOOD, "n": 1000}, 400),
    ("stream a string", {**GOOD, "stream": "yes"}, 400),
    ("stop a number", {**GOOD, "stop": 3}, 400),
    ("logprobs too many", {**GOOD, "logprobs": 1000}, 400),
    ("seed a float", {**GOOD, "seed": 1.5}, 400),
    ("echo a number", {**GOOD, "echo": 1}, 400),
    ("oversize body", {**GOOD, "prompt": "x" * (2 << 20)}, 413),
    ("chat messages not a list", {"model": "tiny", "messages": "hi"}, 400),
    ("chat unknown role", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400),
]


def post(url: str, body, path: str = "/v1/completions", key: str | None = KEY, method: str = "POST"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + path, data=data if method == "POST" else None, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("name, body, status", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_gets_an_openai_error_and_the_server_keeps_serving(server, name, body, status):
    path = "/v1/chat/completions" if name.startswith("chat") else "/v1/completions"
    code, reply = post(server.url, body, path)
    assert code == status, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["message"]
    assert post(server.url, GOOD)[0] == 200


def test_auth_routes_and_methods(server):
    assert post(server.url, GOOD, key=None)[0] == 401
    assert post(server.url, GOOD, key="nope")[0] == 401
    code, reply = post(server.url, b"", "/v1/nothing-here", method="GET")
    assert code == 404 and reply["error"]["code"] == "not_found"
    assert post(server.url, b"", "/v1/completions", method="GET")[0] == 405
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:  # no key needed
        assert json.loads(r.read())["status"] == "ok"


def test_client_disconnect_mid_stream_frees_the_row(server):
    body = json.dumps({**GOOD, "max_tokens": 60, "stream": True, "prompt": "a"}).encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            assert b"200 OK" in s.recv(4096)
        # the socket closes after the first bytes
    assert post(server.url, GOOD)[0] == 200
    deadline = time.time() + 30
    while time.time() < deadline:  # the abandoned rows leave the batch
        with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
            if json.loads(r.read())["active"] == 0:
                break
        time.sleep(0.1)
    else:
        pytest.fail("abandoned streams still hold rows")


@pytest.fixture
def slow_ckpt(tmp_path) -> Path:
    path = tmp_path / "slow"
    save_checkpoint(path, tiny_model(context_length=512, emb_dim=128, n_layers=4), get_tokenizer("gpt2"))
    return path


def test_queue_full_is_503_and_sigterm_finishes_the_stream_in_flight(slow_ckpt):
    s = Server("--checkpoint", slow_ckpt, "--max-batch", "1", "--max-queue", "1", "--shutdown-timeout", "600")
    try:
        long = {"model": "slow", "prompt": "go", "max_tokens": 200, "temperature": 0, "stream": True}
        req = urllib.request.Request(s.url + "/v1/completions", data=json.dumps(long).encode(),
                                     headers={"Content-Type": "application/json"})
        stream = urllib.request.urlopen(req, timeout=300)
        assert stream.readline().startswith(b"data: ")  # decoding: the one row is busy
        waiting = ThreadPoolExecutor(1).submit(post, s.url, {**long, "stream": False, "max_tokens": 5}, key=None)
        deadline = time.time() + 120
        while time.time() < deadline:
            with urllib.request.urlopen(s.url + "/health", timeout=30) as r:
                if json.loads(r.read())["waiting"] == 1:
                    break
            time.sleep(0.05)
        code, reply = post(s.url, {**long, "stream": False}, key=None)
        assert code == 503 and reply["error"]["code"] == "server_overloaded"
        s.proc.send_signal(signal.SIGTERM)  # the stream in flight still runs to its end
        rest = stream.read().decode()
        assert rest.rstrip().endswith("data: [DONE]")
        events = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert waiting.result(300)[0] == 200
        assert s.proc.wait(120) == 0
        with pytest.raises(OSError):
            urllib.request.urlopen(s.url + "/health", timeout=5)
    finally:
        s.stop()


# --- the playground page in a real browser ---------------------------------------------------------------
def chromium():
    """A headless Chromium driven by Selenium through Debian's chromium-driver, or a skip with the reason."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[test]')")
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no Chromium + chromedriver installed (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def open_playground(browser, url: str, prompt: str):
    """The keyed server's playground, its key entered and `prompt` typed; a 60 s wait on the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: "API key" in b.find_element(By.ID, "model").text)  # this server wants a key
    browser.find_element(By.ID, "key").send_keys(KEY)
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    return wait


def test_playground_streams_coloured_tokens_with_hover_alternatives(server, tiny_ckpt, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser = chromium()
    try:
        wait = open_playground(browser, server.url, "Hello world")
        assert browser.find_element(By.ID, "max_tokens-v").text == "auto"  # the default: what the context leaves
        assert not browser.find_element(By.ID, "modes").is_displayed()  # no chat template: no chat mode
        for slider, keys in (("temperature", [Keys.HOME]), ("max_tokens", [Keys.HOME] + [Keys.ARROW_RIGHT] * 10)):
            browser.find_element(By.ID, slider).send_keys(*keys)  # as a keyboard user moves a slider
        assert browser.find_element(By.ID, "temperature-v").text == "0"
        assert browser.find_element(By.ID, "max_tokens-v").text == "10"
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: "(length)" in b.find_element(By.ID, "status").text)
        assert "tiny" in browser.find_element(By.ID, "model").text
        tokens = browser.find_elements(By.CSS_SELECTOR, "#output .tok")
        assert len(tokens) == 10
        assert "".join(t.get_attribute("textContent") for t in tokens) == reference(tiny_ckpt, "Hello world", 10)
        probs = [float(t.get_attribute("data-p")) for t in tokens]
        assert all(0 < p <= 1 for p in probs)
        assert all(t.value_of_css_property("background-color") not in ("", "rgba(0, 0, 0, 0)") for t in tokens)
        ActionChains(browser).move_to_element(tokens[0]).perform()
        wait.until(lambda b: b.find_element(By.ID, "alts").is_displayed())
        rows = browser.find_elements(By.CSS_SELECTOR, "#alts tbody tr")
        assert len(rows) == 5
        shown = [float(r.find_elements(By.TAG_NAME, "td")[1].text.rstrip("%")) for r in rows]
        assert shown == sorted(shown, reverse=True) and shown[0] == pytest.approx(100 * probs[0], rel=0.01)
        assert "chosen" in rows[0].get_attribute("class")  # greedy: the chosen token is the most likely
        browser.save_screenshot(str(tmp_path / "playground.png"))
    finally:
        browser.quit()


def test_playground_first_generate_on_a_small_context_fills_what_it_leaves(server, tiny_ckpt):
    """The playground's defaults on a 64-token model: a 36-token prompt, Generate, and the reply takes the
    28 positions left (the old default of 64 tokens was a 400 here)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    text = "The cat sat on the mat and " * 5
    ids = load_checkpoint(tiny_ckpt).tokenizer.encode(text)
    assert len(ids) == 36
    browser = chromium()
    try:
        wait = open_playground(browser, server.url, text)
        browser.find_element(By.ID, "temperature").send_keys(Keys.HOME)  # greedy, to compare with the library
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: "(length)" in b.find_element(By.ID, "status").text)
        tokens = browser.find_elements(By.CSS_SELECTOR, "#output .tok")
        assert len(tokens) == 64 - 36
        assert "".join(t.get_attribute("textContent") for t in tokens) == reference(tiny_ckpt, text, 28)
        assert browser.find_element(By.ID, "max_tokens").get_attribute("max") == "63"  # the slider's reach: the context
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def chat_ckpt(tmp_path_factory) -> Path:
    """A brief instruction fine-tune (96-token context): its server answers /v1/chat/completions."""
    from build_llm.train.config import FinetuneConfig
    from build_llm.train.finetune import finetune

    tmp = tmp_path_factory.mktemp("chat")
    tok = words_tokenizer()
    torch.manual_seed(0)
    save_checkpoint(tmp / "base", GPTModel(tiny_cfg(tok.vocab_size)), tok)
    write_instruct_json(tmp / "train.json")
    finetune(tmp / "sft", tmp / "base", FinetuneConfig(task="instruct", steps=4, lr=3e-3), data=tmp / "train.json",
             log=lambda s: None)
    return tmp / "sft"


def test_playground_chat_mode_shows_the_conversation(chat_ckpt, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from build_llm.infer.chat import respond
    from build_llm.store.finetuned import load_finetuned

    ft = load_finetuned(chat_ckpt)
    s = Server("--checkpoint", chat_ckpt)
    browser = chromium()
    try:
        browser.get(s.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_element(By.ID, "modes").is_displayed())  # a chat template: chat mode offered
        assert browser.find_element(By.ID, "mode-chat").is_selected()  # and chosen
        assert browser.find_element(By.ID, "generate").text == "Send"
        assert not browser.find_element(By.ID, "output").is_displayed()
        browser.find_element(By.ID, "temperature").send_keys(Keys.HOME)  # greedy, to compare with the library
        box = browser.find_element(By.ID, "prompt")

        def say(text: str) -> list[str]:
            box.send_keys(text)
            browser.find_element(By.ID, "generate").click()
            wait.until(lambda b: "(stop)" in b.find_element(By.ID, "status").text
                       or "(length)" in b.find_element(By.ID, "status").text)
            return [m.get_attribute("textContent") for m in browser.find_elements(By.CSS_SELECTOR, "#chat .msg")]

        first = respond(ft.model, ft.tokenizer, [{"role": "user", "content": "what is the word"}])
        assert say("what is the word") == ["what is the word", first]
        assert box.get_attribute("value") == ""
        # 75 + 21 tokens fill the 96-token window: the next message drops the first exchange, greyed out
        second = respond(ft.model, ft.tokenizer, [{"role": "user", "content": "what colour"}])
        assert say("what colour") == ["what is the word", first, "what colour", second]
        assert "dropped the 1 oldest exchange" in browser.find_element(By.ID, "status").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#chat .msg.dropped")) == 2
        roles = [m.get_attribute("data-role") for m in browser.find_elements(By.CSS_SELECTOR, "#chat .msg")]
        assert roles == ["user", "assistant"] * 2
        browser.save_screenshot(str(tmp_path / "chat.png"))
        browser.find_element(By.ID, "reset").click()
        assert browser.find_elements(By.CSS_SELECTOR, "#chat .msg") == []
    finally:
        browser.quit()
        assert s.stop() == 0


@pytest.mark.slow
def test_load_script_runs_clean_against_a_tiny_model(tiny_ckpt, tmp_path):
    script = Path(__file__).resolve().parents[2] / "examples" / "serve_load.py"
    done = subprocess.run([sys.executable, str(script), "--checkpoint", str(tiny_ckpt), "--clients", "4", "--seconds", "6",
                           "--solo-seconds", "3", "--max-tokens", "16", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads((tmp_path / "load.json").read_text())
    assert r["loaded"]["errors"] == 0 and r["loaded"]["requests"] >= 4 and r["server_exit_code"] == 0
    assert 0 < r["loaded"]["completion_tokens"] <= 16 * r["loaded"]["requests"]
    assert 0 < r["loaded"]["ttft_p50_s"] <= r["loaded"]["ttft_p95_s"]


@pytest.mark.slow
def test_an_instruction_fine_tune_answers_chat_in_its_template(tmp_path):
    """`build-llm finetune instruct`'s checkpoint, served: /v1/chat/completions renders the messages in
    the fine-tuning template, and the model gives the answer it learned."""
    from build_llm.train.finetune import finetune
    from build_llm.train.config import FinetuneConfig

    tok = words_tokenizer()
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "base", GPTModel(tiny_cfg(tok.vocab_size)), tok)
    write_instruct_json(tmp_path / "train.json")
    finetune(tmp_path / "sft", tmp_path / "base", FinetuneConfig(task="instruct", epochs=8, batch_size=8, lr=3e-3),
             data=tmp_path / "train.json", log=lambda s: None)
    s = Server("--checkpoint", tmp_path / "sft")
    try:
        chat = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        assert chat.models.list().data[0].model_extra["chat"] is True
        r = chat.chat.completions.create(model="sft", max_tokens=8, temperature=0, messages=[
            {"role": "user", "content": "what is the word\n\n### Input:\ndog"}])
        assert r.choices[0].message.content == "animal" and r.choices[0].finish_reason == "stop"
    finally:
        assert s.stop() == 0
