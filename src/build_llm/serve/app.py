"""The OpenAI-compatible HTTP API (Starlette, served by uvicorn) over the batching engine.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, and the
playground page at /. Errors are OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`)
with the matching status: 400 bad request, 401 missing or wrong key, 404 unknown model or route,
405 wrong method, 413 body too large, 503 queue full, 500 a bug.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from build_llm.serve.engine import Engine, QueueFull, Sequence, Token

STATIC = Path(__file__).parent / "static"


@dataclass
class Settings:
    model_name: str
    dtype: str = "float32"
    api_key: str | None = None
    max_body: int = 1 << 20  # bytes of a request body
    max_tokens: int | None = None  # the largest max_tokens a request may ask (default: the context)
    max_n: int = 8
    max_logprobs: int = 20
    # messages -> the prompt's token ids, ending where the assistant's reply begins (None: no chat)
    chat_template: Callable[[list[dict[str, str]]], list[int]] | None = None
    created: int = field(default_factory=lambda: int(time.time()))


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


# --- request validation ----------------------------------------------------------------------------
def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)  # no NaN / Infinity
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body is a JSON {type(body).__name__}; send a JSON object", code="invalid_json")
    return body


def _number(body: dict, key: str, default: float | None, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ApiError(400, f"{key}={value!r} is invalid; expected a number in {interval}", param=key)
    return float(value)


def _integer(body: dict, key: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"{key}={value!r} is invalid; expected an integer in [{low}, {high}]", param=key)
    return value


def _boolean(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{key}={value!r} is invalid; expected true or false", param=key)
    return value


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    n: int
    stop: list[str]
    seed: int | None
    stream: bool
    logprobs: int | None
    echo: bool
    truncate: bool
    include_usage: bool = False


def parse_sampling(body: dict, settings: Settings, context_length: int, default_max_tokens: int | None) -> Sampling:
    limit = settings.max_tokens or context_length
    max_tokens = _integer(body, "max_tokens", default_max_tokens, 0, limit)
    if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
        max_tokens = _integer(body, "max_completion_tokens", None, 0, limit)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop={body.get('stop')!r} is invalid; expected a non-empty string or a list of up to 4",
                       param="stop")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = body.get("top_k")
    if top_k in (0, -1):  # 0 or -1: no top-k cut (as other servers accept)
        top_k = None
    top_k = _integer({"top_k": top_k}, "top_k", None, 1, 1 << 30)
    logprobs = body.get("logprobs")
    if logprobs is False:
        logprobs = None
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options={options!r} is invalid; expected an object such as "
                            '{"include_usage": true}', param="stream_options")
    return Sampling(include_usage=_boolean(options, "include_usage"), 
        max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=None if top_p == 1.0 else top_p, top_k=top_k, n=_integer(body, "n", 1, 1, settings.max_n), stop=stop,
        seed=_integer(body, "seed", None, -(1 << 63), (1 << 63) - 1), stream=_boolean(body, "stream"),
        logprobs=_integer({"logprobs": logprobs}, "logprobs", None, 0, settings.max_logprobs),
        echo=_boolean(body, "echo"), truncate=_boolean(body, "truncate"))


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def parse_prompts(body: dict, encode: Callable[[str], list[int]], vocab_size: int) -> list[tuple[list[int], str | None]]:
    """(token ids, text or None) of each prompt: a string, a list of strings, a list of token ids,
    or a list of lists of token ids."""
    if "prompt" not in body:
        raise ApiError(400, "prompt is required: a string, a list of strings, or token ids", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif _is_ids(prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        items = prompt
    else:
        raise ApiError(400, "prompt is invalid; expected a string, a non-empty list of strings, a list of token ids "
                            "or a list of lists of token ids", param="prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            ids = encode(item)
            if not ids:
                raise ApiError(400, "prompt is empty; give at least one token of text", param="prompt")
            out.append((ids, item))
        else:
            if any(not 0 <= i < vocab_size for i in item):
                raise ApiError(400, f"prompt holds token ids outside [0, {vocab_size})", param="prompt")
            out.append((list(item), None))
    return out


# --- one choice: tokens in, text and logprobs out ---------------------------------------------------
class Choice:
    """Turns the engine's tokens for one sequence into OpenAI text, logprobs and a finish reason.

    Text goes out only when it is final: a trailing partial UTF-8 character, or a tail that could
    still grow into a stop string, is held back until the next token decides it.
    """

    def __init__(self, index: int, tokenizer: Any, stop: list[str], want_logprobs: bool, eos_id: int | None) -> None:
        self.index, self.tokenizer, self.stop, self.want_logprobs, self.eos_id = index, tokenizer, stop, want_logprobs, eos_id
        self.ids: list[int] = []
        self.text = ""  # final text of the completion so far (sent or to send)
        self.sent = 0
        self.prefix = ""  # the echoed prompt
        self.finish: str | None = None
        self.seq: Sequence | None = None
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self.completion_tokens = 0

    def piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def add_logprobs(self, tokens: list[Token], offset: int) -> None:
        for t in tokens:
            s = self.piece(t.id)
            self.tokens.append(s)
            self.token_logprobs.append(t.logprob)
            self.top_logprobs.append(None if t.top is None else {self.piece(i): lp for i, lp in t.top})
            self.text_offset.append(offset)
            offset += len(s)

    def on_prompt(self, tokens: list[Token], prompt_ids: list[int]) -> None:
        self.prefix = self.tokenizer.decode(prompt_ids)
        if self.want_logprobs:
            self.add_logprobs(tokens, 0)

    def on_token(self, token: Token) -> None:
        if self.finish is not None:
            return
        self.completion_tokens += 1
        if self.eos_id is not None and token.id == self.eos_id:
            self.finish = "stop"
            self.text = self.tokenizer.decode(self.ids)
            return
        if self.want_logprobs:
            self.add_logprobs([token], len(self.prefix) + len(self.tokenizer.decode(self.ids)))
        self.ids.append(token.id)
        full = self.tokenizer.decode(self.ids)
        hits = [full.find(s) for s in self.stop if s in full]
        if hits:
            self.text = full[:min(hits)]
            self.finish = "stop"
            if self.seq is not None:
                self.seq.cancel()
            return
        keep = len(full.rstrip("\ufffd"))  # a character still being spelled out in bytes
        for s in self.stop:  # a tail that may become a stop string
            for k in range(min(len(s) - 1, keep), 0, -1):
                if full[:keep].endswith(s[:k]):
                    keep -= k
                    break
        self.text = full[:keep] if keep >= self.sent else full[:self.sent]

    def on_done(self, reason: str) -> None:
        if self.finish is None:
            self.text = self.tokenizer.decode(self.ids)
            self.finish = "length" if reason in ("length", "cancelled") else reason

    def take(self) -> str:
        """Text not yet sent (for streaming)."""
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta

    def logprobs_since(self, start: int) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}


# --- the app -------------------------------------------------------------------------------------------
def create_app(engine: Engine, tokenizer: Any, settings: Settings) -> Starlette:
    """The Starlette app serving `engine`'s model (the engine thread is started and stopped with it)."""
    context_length = engine.context_length
    vocab_size = engine.model.cfg.vocab_size
    eos_id = getattr(tokenizer, "eos_id", None)

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise ApiError(401, "missing or incorrect API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def read_body(request: Request) -> dict[str, Any]:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= settings.max_body:
                chunks.append(chunk)
            elif size > 16 * settings.max_body:  # far over: stop reading (the client sees the connection close)
                break
        # A body over the limit is read to its end (up to 16 times the limit) and dropped, so that the
        # client, still sending, can read the 413 instead of a reset connection.
        if size > settings.max_body:
            raise ApiError(413, f"the request body has {size}{'+' if size > 16 * settings.max_body else ''} bytes; "
                                f"the limit is {settings.max_body}", code="request_too_large")
        return parse_json(b"".join(chunks))

    def check_model(body: dict) -> None:
        model = body.get("model")
        if model is None:
            raise ApiError(400, f"model is required; this server has {settings.model_name!r}", param="model")
        if model != settings.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server has {settings.model_name!r}",
                           param="model", code="model_not_found")

    def fit(ids: list[int], sampling: Sampling) -> list[int]:
        need = len(ids) + sampling.max_tokens
        if need <= context_length:
            return ids
        room = context_length - sampling.max_tokens
        if sampling.truncate and room >= 1:
            return ids[-room:]
        raise ApiError(400, f"this model's maximum context length is {context_length} tokens, but {need} were asked "
                            f"({len(ids)} in the prompt, {sampling.max_tokens} for the completion); shorten the "
                            "prompt or max_tokens, or send \"truncate\": true to keep the prompt's last tokens",
                       param="prompt", code="context_length_exceeded")

    async def run(prompts: list[tuple[list[int], str | None]], sampling: Sampling
                  ) -> tuple[list[Choice], list[list[int]], asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        choices, seqs, used = [], [], []
        for p, (ids, _) in enumerate(prompts):
            ids = fit(ids, sampling)
            used.append(ids)
            for j in range(sampling.n):
                index = p * sampling.n + j
                choice = Choice(index, tokenizer, sampling.stop, sampling.logprobs is not None, eos_id)

                def emit(kind: str, payload: object, index: int = index) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, (index, kind, payload))
                seed = None if sampling.seed is None else (sampling.seed + index) % (1 << 63)
                choice.seq = Sequence(ids, sampling.max_tokens, emit, temperature=sampling.temperature,
                                      top_k=sampling.top_k, top_p=sampling.top_p, seed=seed, logprobs=sampling.logprobs,
                                      echo=sampling.echo, eos_id=eos_id)
                choices.append(choice)
                seqs.append(choice.seq)
        try:
            engine.submit(seqs)
        except QueueFull as e:
            raise ApiError(503, f"the server is busy: {e}; retry later", code="server_overloaded") from None
        return choices, used, queue

    def apply(choices: list[Choice], used: list[list[int]], n: int, event: tuple) -> Choice:
        index, kind, payload = event
        choice = choices[index]
        if kind == "prompt":
            choice.on_prompt(payload, used[index // n])
        elif kind == "token":
            choice.on_token(payload)
        elif kind == "done":
            choice.on_done(payload)
        elif kind == "error":
            raise ApiError(500, f"decoding failed: {payload}", code="engine_error")
        return choice

    async def generate(prompts, sampling: Sampling, chat: bool, request: Request) -> Response:
        choices, used, queue = await run(prompts, sampling)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        usage = {"prompt_tokens": sum(len(u) for u in used) * sampling.n}
        if sampling.stream:
            return StreamingResponse(stream_events(choices, used, queue, sampling, chat, rid, created),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            while any(c.finish is None for c in choices):
                apply(choices, used, sampling.n, await queue.get())
        finally:
            for c in choices:
                c.seq.cancel()
        completion = sum(c.completion_tokens for c in choices)
        usage.update(completion_tokens=completion, total_tokens=usage["prompt_tokens"] + completion)
        if chat:
            body_choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": None, "finish_reason": c.finish} for c in choices]
            return JSONResponse({"id": rid, "object": "chat.completion", "created": created,
                                 "model": settings.model_name, "choices": body_choices, "usage": usage})
        body_choices = [{"index": c.index, "text": (c.prefix if sampling.echo else "") + c.text,
                         "logprobs": c.logprobs_since(0), "finish_reason": c.finish} for c in choices]
        return JSONResponse({"id": rid, "object": "text_completion", "created": created,
                             "model": settings.model_name, "choices": body_choices, "usage": usage})

    async def stream_events(choices, used, queue, sampling: Sampling, chat: bool, rid: str, created: int
                            ) -> AsyncIterator[str]:
        def chunk(choice: Choice, text: str, logprobs, finish) -> str:
            if chat:
                delta = {"content": text} if text else {}
                payload = {"id": rid, "object": "chat.completion.chunk", "created": created,
                           "model": settings.model_name,
                           "choices": [{"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            else:
                payload = {"id": rid, "object": "text_completion", "created": created, "model": settings.model_name,
                           "choices": [{"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
            return f"data: {json.dumps(payload)}\n\n"

        try:
            if chat:  # the role comes first, as OpenAI streams it
                for c in choices:
                    yield (f"data: {json.dumps({'id': rid, 'object': 'chat.completion.chunk', 'created': created, 'model': settings.model_name, 'choices': [{'index': c.index, 'delta': {'role': 'assistant', 'content': ''}, 'logprobs': None, 'finish_reason': None}]})}\n\n")
            reported = [0] * len(choices)
            while any(c.finish is None for c in choices):
                try:
                    c = apply(choices, used, sampling.n, await queue.get())
                except ApiError as e:
                    yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'param': None, 'code': e.code}})}\n\n"
                    return
                text = c.take()
                if sampling.echo and c.prefix and reported[c.index] == 0 and not getattr(c, "echoed", False):
                    text, c.echoed = c.prefix + text, True
                logprobs = c.logprobs_since(reported[c.index])
                reported[c.index] = len(c.tokens)
                if text or c.finish is not None or (logprobs and logprobs["tokens"]):
                    yield chunk(c, text, logprobs, c.finish)
            if sampling.include_usage:  # OpenAI's stream_options: one last chunk with the counts
                prompt_tokens = sum(len(u) for u in used) * sampling.n
                completion = sum(c.completion_tokens for c in choices)
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                         "total_tokens": prompt_tokens + completion}
                yield (f"data: {json.dumps({'id': rid, 'object': 'chat.completion.chunk' if chat else 'text_completion', 'created': created, 'model': settings.model_name, 'choices': [], 'usage': usage})}\n\n")
            yield "data: [DONE]\n\n"
        finally:  # the client went away, or we are done: free the rows
            for c in choices:
                c.seq.cancel()

    async def completions(request: Request) -> Response:
        check_key(request)
        body = await read_body(request)
        check_model(body)
        sampling = parse_sampling(body, settings, context_length, 16)
        prompts = parse_prompts(body, tokenizer.encode, vocab_size)
        if len(prompts) * sampling.n > engine.max_queue:
            raise ApiError(400, f"{len(prompts)} prompts x n={sampling.n} is more than the {engine.max_queue} "
                                "sequences this server queues; send fewer", param="n")
        return await generate(prompts, sampling, False, request)

    async def chat_completions(request: Request) -> Response:
        check_key(request)
        body = await read_body(request)
        check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in messages) or messages[-1]["role"] != "user":
            raise ApiError(400, "messages is invalid; expected a non-empty list of {\"role\": system|user|assistant, "
                                "\"content\": text} ending with the user's message", param="messages")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if settings.chat_template is None:
            raise ApiError(400, f"the model {settings.model_name!r} has no chat template (it was not instruction-"
                                "tuned); use /v1/completions", param="messages", code="no_chat_template")
        sampling = parse_sampling(body, settings, context_length, None)
        if sampling.logprobs is not None or sampling.echo:
            raise ApiError(400, "logprobs and echo are supported by /v1/completions only", param="logprobs")
        if sampling.max_tokens is None:
            sampling.max_tokens = min(256, settings.max_tokens or context_length)
        try:
            ids = settings.chat_template(messages)
        except ValueError as e:
            raise ApiError(400, " ".join(str(e).split()), param="messages") from None
        return await generate([(ids, None)], sampling, True, request)

    async def models(request: Request) -> Response:
        check_key(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model_info(request: Request) -> Response:
        check_key(request)
        if request.path_params["model"] != settings.model_name:
            raise ApiError(404, f"the model {request.path_params['model']!r} does not exist; this server has "
                                f"{settings.model_name!r}", param="model", code="model_not_found")
        return JSONResponse(model_card())

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": settings.created, "owned_by": "build-llm",
                "context_length": context_length, "dtype": settings.dtype,
                "chat": settings.chat_template is not None}

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": settings.model_name, "dtype": settings.dtype, **engine.load})

    async def playground(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def on_api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)

    async def on_disconnect(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)

    async def on_bug(request: Request, exc: Exception) -> Response:
        return error_response(500, f"internal error: {type(exc).__name__}", code="internal_error", kind="server_error")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if not engine.thread.is_alive():
            engine.start()
        yield
        engine.stop()

    routes = [Route("/", playground), Route("/health", health), Route("/v1/models", models),
              Route("/v1/models/{model:path}", model_info),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={ApiError: on_api_error, HTTPException: on_http_error,
                                         ClientDisconnect: on_disconnect, Exception: on_bug})
