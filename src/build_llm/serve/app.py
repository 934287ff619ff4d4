"""The OpenAI-compatible HTTP API (Starlette, served by uvicorn) over the batching engine.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health, and the
playground page at /. Errors are OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`)
with the matching status: 400 bad request, 401 missing or wrong key, 403 a Host this server does not
answer to or a cross-origin preflight, 404 unknown model or route, 405 wrong method, 413 body too
large, 415 a POST body that is not application/json, 503 queue full, 500 a bug.

A server on this machine is reachable from any web page its user opens, so `Guard` stands in front
of the routes: a POST must be sent as JSON (a page can send text/plain or a form to another site
without asking first, but not JSON), cross-origin preflights are refused (no page of another site
may send JSON here or read an answer), and a server bound to a loopback address answers only Host
names that mean this machine (a DNS-rebinding page makes its own name point at 127.0.0.1; its
requests then carry that name, and are refused).

`Api` holds the engine, the tokenizer and the settings; its methods are the routes, and
`create_app` mounts them. A request's sequences go to the engine; their tokens come back on an
asyncio queue (through the `Outbox`: one wake-up of the loop per decoding step, not per token), and a
`Completion` turns them into one JSON body or a stream of server-sent events.
Parsing and checking requests, and turning tokens into OpenAI choices, is protocol.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Iterable

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from build_llm.infer.generate import decodable_ids
from build_llm.serve.engine import Engine, QueueFull, Sequence
from build_llm.serve.protocol import (ApiError, Choice, Sampling, Settings, error_response, parse_json,
                                      parse_messages, parse_prompts, parse_sampling)

STATIC = Path(__file__).parent / "static"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
RETRY_AFTER = 1  # seconds a client turned away by a full queue is asked to wait: rows free as replies end


# --- who may talk to the server -----------------------------------------------------------------------
def host_name(value: str) -> str:
    """The name in a Host header (or an --allow-host value), lower case and without the port:
    'LocalHost:8000' -> 'localhost', '[::1]:8000' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    return value.partition(":")[0] if value.count(":") == 1 else value


def is_loopback(host: str) -> bool:
    name = host_name(host)
    try:
        return name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind: str, allow: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names a server bound to the address `bind` answers (None: any).

    Bound to loopback: this machine's names and `allow`. Bound to another address: any Host, unless
    `allow` names some (then those and this machine's names). The bound address itself always counts:
    an address typed as a number cannot be rebound by DNS."""
    allow = {host_name(a) for a in allow}
    if not allow and not is_loopback(bind):
        return None
    bound = {host_name(bind)} - {"", "0.0.0.0", "::"}
    return frozenset(LOOPBACK_NAMES) | bound | allow


class Guard:
    """ASGI middleware refusing what a web page of another site could send (see the module's docstring)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    def problem(self, method: str, headers: Headers) -> ApiError | None:
        allowed = self.settings.allowed_hosts
        host = headers.get("host")
        if allowed is not None and (host is None or host_name(host) not in allowed):
            # 403 rather than 421 (Misdirected Request): a client may retry a 421 on another
            # connection by itself, and the answer here will not change.
            return ApiError(403, f"the Host header {host!r} is not a name this server answers to "
                                 f"({', '.join(sorted(allowed))}); start it with --allow-host NAME to add one",
                            code="host_not_allowed")
        if method == "OPTIONS" and "origin" in headers and "access-control-request-method" in headers:
            return ApiError(403, f"cross-origin requests are refused: {headers['origin']!r} may not call this "
                                 "server from a web page (no CORS)", code="cross_origin_refused")
        media = headers.get("content-type", "").partition(";")[0].strip().lower()
        if method == "POST" and media != "application/json":
            given = f"Content-Type {media!r}" if media else "no Content-Type"
            return ApiError(415, f"the request body has {given}; send JSON with 'Content-Type: application/json'",
                            code="unsupported_media_type")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            error = self.problem(scope["method"], Headers(scope=scope))
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class Unfinished:
    """ASGI middleware answering the requests the server stops before it has finished them. Once --shutdown-timeout
    has passed after SIGTERM, uvicorn cancels them: each would end in a plain-text 500 or a cut stream, and print a
    traceback. Each gets OpenAI's error instead, a 503 (retry later), or, in a stream, a last event saying so."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:  # nothing but the server's shutdown cancels a request
            error = ApiError(503, "the server is shutting down and stopped before this request was finished; retry "
                                  "later", code="server_shutting_down", headers={"Retry-After": str(RETRY_AFTER)})
            with contextlib.suppress(Exception):  # a client gone meanwhile: nobody to tell
                if not started:
                    await error.response()(scope, receive, send)
                else:  # a stream: its last event
                    await send({"type": "http.response.body", "body": sse(error.body()).encode(), "more_body": False})


async def disconnected(request: Request) -> None:
    """Return once the client has gone away (its body was read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.1)  # a server whose receive does not wait: poll


class Outbox:
    """The engine thread's reports on their way to the event loop's queues, one wake-up of the loop for all that
    arrive together: a decoding step reports a token for every row, and waking the loop once per report (a write
    to its self-pipe, a pass of its selector, each) cost the engine's thread and the loop's as much as the
    reports themselves. Each queue receives its reports in the order they were posted."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list[tuple[asyncio.Queue, tuple]] = []
        self.wakeups = 0  # times the loop was woken (for tests: one per batch of reports)
        self.ran = loop.is_running()  # the loop has run (the app makes its Outbox on it): not running now = stopped

    def post(self, queue: asyncio.Queue, item: tuple) -> None:
        """From any thread: `item` for `queue`, delivered on the loop (reports posted before the loop first runs
        wait for it). RuntimeError once the loop has stopped or closed: the server is shutting down and nobody
        will read the queues, so the reports waiting are dropped and the engine drops the sequence that posted
        (as it does any sequence whose report fails) rather than decode on for no one."""
        with self.lock:
            if self.loop.is_closed() or (self.ran and not self.loop.is_running()):
                self.items.clear()
                raise RuntimeError("the server's event loop has stopped: no one reads this sequence's reports")
            self.items.append((queue, item))
            if len(self.items) > 1:  # a wake-up is already on its way, and will deliver this too
                return
            self.wakeups += 1
        try:
            self.loop.call_soon_threadsafe(self.deliver)
        except RuntimeError:  # closed meanwhile: nobody will read these, and the next post must fail too
            with self.lock:
                self.items.clear()
            raise

    def deliver(self) -> None:
        self.ran = True
        with self.lock:
            items, self.items = self.items, []
        for queue, item in items:
            queue.put_nowait(item)


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying `payload` as JSON."""
    return f"data: {json.dumps(payload)}\n\n"


class Completion:
    """One request's choices on their way from the engine's thread to the client.

    The engine's reports (index, kind, payload) arrive on `queue`; `body` waits for every choice to
    finish and returns the response's JSON, `events` streams the text as it comes. Either frees the
    engine's rows when it ends, however it ends (a finished reply, an error, a client gone away).
    """

    def __init__(self, choices: list[Choice], used: list[list[int]], queue: asyncio.Queue, sampling: Sampling,
                 chat: bool, model_name: str) -> None:
        self.choices, self.used, self.queue, self.sampling, self.chat = choices, used, queue, sampling, chat
        self.model_name = model_name
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name}

    def usage(self) -> dict[str, int]:
        prompt_tokens = sum(len(u) for u in self.used) * self.sampling.n
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def apply(self, event: tuple) -> Choice:
        index, kind, payload = event
        choice = self.choices[index]
        if kind == "prompt":
            choice.on_prompt(payload, self.used[index // self.sampling.n])
        elif kind == "token":
            choice.on_token(payload)
        elif kind == "done":
            choice.on_done(payload)
        elif kind == "error":
            raise ApiError(500, f"decoding failed: {payload}", code="engine_error")
        return choice

    def cancel(self) -> None:
        for c in self.choices:
            c.seq.cancel()

    async def body(self) -> dict[str, Any]:
        try:
            while any(c.finish is None for c in self.choices):
                self.apply(await self.queue.get())
                if not self.queue.empty():  # a get from a queue holding reports does not yield: let other
                    await asyncio.sleep(0)  # requests and /health in (an empty one's next get yields anyway)
        finally:
            self.cancel()
        if self.chat:
            choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": None, "finish_reason": c.finish} for c in self.choices]
            return {**self.head("chat.completion"), "choices": choices, "usage": self.usage()}
        choices = [{"index": c.index, "text": (c.prefix if self.sampling.echo else "") + c.text,
                    "logprobs": c.logprobs_since(0), "finish_reason": c.finish} for c in self.choices]
        return {**self.head("text_completion"), "choices": choices, "usage": self.usage()}

    def chunk(self, choice: Choice, text: str, logprobs: dict[str, Any] | None) -> str:
        if self.chat:
            delta = {"content": text} if text else {}
            entry = {"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": choice.finish}
            return sse({**self.head("chat.completion.chunk"), "choices": [entry]})
        entry = {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish}
        return sse({**self.head("text_completion"), "choices": [entry]})

    async def events(self) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        try:
            if self.chat:  # the role comes first, as OpenAI streams it
                for c in self.choices:
                    role = {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}
                    yield sse({**self.head(kind), "choices": [role]})
            reported = [0] * len(self.choices)
            while any(c.finish is None for c in self.choices):
                try:
                    c = self.apply(await self.queue.get())
                    if not self.queue.empty():  # as in body: other requests in between tokens
                        await asyncio.sleep(0)
                except ApiError as e:
                    yield sse(e.body())
                    return
                text = c.take()
                if self.sampling.echo and c.prefix and reported[c.index] == 0 and not c.echoed:
                    text, c.echoed = c.prefix + text, True
                logprobs = c.logprobs_since(reported[c.index])
                reported[c.index] = len(c.tokens)
                if text or c.finish is not None or (logprobs and logprobs["tokens"]):
                    yield self.chunk(c, text, logprobs)
            if self.sampling.include_usage:  # OpenAI's stream_options: one last chunk with the counts
                yield sse({**self.head(kind), "choices": [], "usage": self.usage()})
            yield "data: [DONE]\n\n"
        finally:  # the client went away, or we are done: free the rows
            self.cancel()


class Api:
    """The routes over one engine, as methods (see `create_app`)."""

    def __init__(self, engine: Engine, tokenizer: Any, settings: Settings) -> None:
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.context_length = engine.context_length
        # The ids a prompt may hold and the engine may produce: those the tokenizer can turn into text (a padded
        # embedding's last rows are no tokens: decoding them would fail the request).
        self.vocab_size = engine.vocab_size = decodable_ids(engine.model, tokenizer)
        eos = getattr(tokenizer, "eos_id", None)
        self.stop_ids = frozenset(() if eos is None else (eos,))  # where a completion ends
        self.chat_stop_ids = frozenset(settings.chat_stop_ids) or self.stop_ids  # where a chat reply ends
        self.outbox: Outbox | None = None

    def outbox_of(self, loop: asyncio.AbstractEventLoop) -> Outbox:
        """The Outbox of the event loop serving the requests (a new one if the app is served by another loop)."""
        if self.outbox is None or self.outbox.loop is not loop:
            self.outbox = Outbox(loop)
        return self.outbox

    # --- what every request is checked for ---------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if self.settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.settings.api_key}".encode()):
            raise ApiError(401, "missing or incorrect API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def read_body(self, request: Request) -> dict[str, Any]:
        limit = self.settings.max_body
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > 16 * limit:  # far over: stop reading (the client sees the connection close)
                break
        # A body over the limit is read to its end (up to 16 times the limit) and dropped, so that the
        # client, still sending, can read the 413 instead of a reset connection.
        if size > limit:
            raise ApiError(413, f"the request body has {size}{'+' if size > 16 * limit else ''} bytes; "
                                f"the limit is {limit}", code="request_too_large")
        return parse_json(b"".join(chunks))

    def check_model(self, body: dict) -> None:
        model, name = body.get("model"), self.settings.model_name
        if model is None:
            raise ApiError(400, f"model is required; this server has {name!r}", param="model")
        if model != name:
            raise ApiError(404, f"the model {model!r} does not exist; this server has {name!r}",
                           param="model", code="model_not_found")

    def check_count(self, prompts: int, n: int) -> None:
        """More sequences than the queue holds can never be served: a 400, where a 503 would have clients retry."""
        if prompts * n > self.engine.max_queue:
            raise ApiError(400, f"{prompts} prompt{'s' if prompts > 1 else ''} x n={n} is more than the "
                                f"{self.engine.max_queue} sequences this server queues; send fewer", param="n")

    def fit(self, ids: list[int], sampling: Sampling) -> tuple[list[int], int]:
        """The prompt's ids, cut to its last tokens when `truncate` asks and it does not fit, and the
        completion's length: max_tokens, or without it what the context leaves after the prompt (as
        OpenAI's chat models do), never more than --max-tokens."""
        context_length = self.context_length
        if sampling.max_tokens is None:
            most = self.settings.max_tokens or context_length
            if len(ids) < context_length:
                return ids, min(most, context_length - len(ids))
            if sampling.truncate:  # keep room for a reply: the prompt's last tokens up to half the window
                room = min(most, context_length // 2)
                return ids[-(context_length - room):], room
            raise ApiError(400, f"this model's maximum context length is {context_length} tokens, and the prompt has "
                                f"{len(ids)}: no room is left for the completion; shorten the prompt, or send "
                                "\"truncate\": true to keep the prompt's last tokens",
                           param="prompt", code="context_length_exceeded")
        need = len(ids) + sampling.max_tokens
        if need <= context_length:
            return ids, sampling.max_tokens
        room = context_length - sampling.max_tokens
        if sampling.truncate and room >= 1:
            return ids[-room:], sampling.max_tokens
        raise ApiError(400, f"this model's maximum context length is {context_length} tokens, but {need} were asked "
                            f"({len(ids)} in the prompt, {sampling.max_tokens} for the completion); shorten the "
                            "prompt or max_tokens, or send \"truncate\": true to keep the prompt's last tokens",
                       param="prompt", code="context_length_exceeded")

    # --- generating ----------------------------------------------------------------------------------
    def submit(self, prompts: list[tuple[list[int], str | None]], sampling: Sampling, chat: bool) -> Completion:
        """`sampling.n` sequences for each prompt, handed to the engine, which reports on the queue."""
        outbox = self.outbox_of(asyncio.get_running_loop())
        queue: asyncio.Queue = asyncio.Queue()
        choices, seqs, used = [], [], []
        stop_ids = self.chat_stop_ids if chat else self.stop_ids
        for p, (ids, _) in enumerate(prompts):
            ids, max_tokens = self.fit(ids, sampling)
            used.append(ids)
            for j in range(sampling.n):
                index = p * sampling.n + j
                choice = Choice(index, self.tokenizer, sampling.stop, sampling.logprobs is not None, stop_ids)

                def emit(kind: str, payload: object, index: int = index) -> None:  # called on the engine's thread
                    outbox.post(queue, (index, kind, payload))
                seed = None if sampling.seed is None else (sampling.seed + index) % (1 << 63)
                choice.seq = Sequence(ids, max_tokens, emit, temperature=sampling.temperature,
                                      top_k=sampling.top_k, top_p=sampling.top_p, seed=seed, logprobs=sampling.logprobs,
                                      echo=sampling.echo, stop_ids=stop_ids)
                choices.append(choice)
                seqs.append(choice.seq)
        try:
            self.engine.submit(seqs)
        except QueueFull as e:  # Retry-After: clients (the openai library among them) wait that long, then retry
            raise ApiError(503, f"the server is busy: {e}; retry later", code="server_overloaded",
                           headers={"Retry-After": str(RETRY_AFTER)}) from None
        return Completion(choices, used, queue, sampling, chat, self.settings.model_name)

    async def reply(self, request: Request, prompts: list[tuple[list[int], str | None]], sampling: Sampling,
                    chat: bool) -> Response:
        completion = self.submit(prompts, sampling, chat)
        if sampling.stream:
            return StreamingResponse(completion.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        collect, gone = asyncio.ensure_future(completion.body()), asyncio.ensure_future(disconnected(request))
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not collect.done():  # the client went away: cancelling frees its rows (Completion.body's finally)
            collect.cancel()
            return Response(status_code=499)
        return JSONResponse(collect.result())

    # --- the routes ----------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        self.check_key(request)
        body = await self.read_body(request)
        self.check_model(body)
        sampling = parse_sampling(body, self.settings, self.context_length, self.vocab_size)
        prompt = body.get("prompt")  # counted before any is encoded: refusing a long list costs nothing
        self.check_count(len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1,
                         sampling.n)
        prompts = parse_prompts(body, self.tokenizer.encode_prompt, self.vocab_size)
        return await self.reply(request, prompts, sampling, False)

    async def chat_completions(self, request: Request) -> Response:
        self.check_key(request)
        body = await self.read_body(request)
        self.check_model(body)
        messages = parse_messages(body)
        settings = self.settings
        if settings.chat_template is None:
            raise ApiError(400, f"the model {settings.model_name!r} has no chat template (it was not instruction-"
                                "tuned); use /v1/completions", param="messages", code="no_chat_template")
        asked = next((k for k in ("logprobs", "top_logprobs", "echo") if body.get(k) is not None
                      and body.get(k) is not False), None)
        if asked is not None:  # before parse_sampling: chat's logprobs is true or false, not completions' count
            raise ApiError(400, f"{asked} is supported by /v1/completions only; leave it out of a chat request",
                           param=asked)
        sampling = parse_sampling(body, settings, self.context_length)
        self.check_count(1, sampling.n)
        try:
            ids = settings.chat_template(messages)
        except ValueError as e:
            raise ApiError(400, " ".join(str(e).split()), param="messages") from None
        return await self.reply(request, [(ids, None)], sampling, True)

    def model_card(self) -> dict[str, Any]:
        s = self.settings
        return {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "build-llm",
                "context_length": self.context_length, "dtype": s.dtype, "chat": s.chat_template is not None}

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model_info(self, request: Request) -> Response:
        self.check_key(request)
        if request.path_params["model"] != self.settings.model_name:
            raise ApiError(404, f"the model {request.path_params['model']!r} does not exist; this server has "
                                f"{self.settings.model_name!r}", param="model", code="model_not_found")
        return JSONResponse(self.model_card())

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.settings.model_name, "dtype": self.settings.dtype,
                             **self.engine.load})

    async def playground(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):
        """The engine's thread runs while the app does."""
        if not self.engine.thread.is_alive():
            self.engine.start()
        yield
        self.engine.stop()


# --- errors: OpenAI's JSON for every failure ---------------------------------------------------------
async def on_api_error(request: Request, exc: ApiError) -> Response:
    return exc.response()


async def on_http_error(request: Request, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)


async def on_disconnect(request: Request, exc: ClientDisconnect) -> Response:
    return Response(status_code=499)


async def on_bug(request: Request, exc: Exception) -> Response:
    return error_response(500, f"internal error: {type(exc).__name__}", code="internal_error", kind="server_error")


def create_app(engine: Engine, tokenizer: Any, settings: Settings) -> Starlette:
    """The Starlette app serving `engine`'s model (the engine thread is started and stopped with it)."""
    api = Api(engine, tokenizer, settings)
    routes = [Route("/", api.playground), Route("/health", api.health), Route("/v1/models", api.models),
              Route("/v1/models/{model:path}", api.model_info),
              Route("/v1/completions", api.completions, methods=["POST"]),
              Route("/v1/chat/completions", api.chat_completions, methods=["POST"])]
    return Starlette(routes=routes, lifespan=api.lifespan,
                     middleware=[Middleware(Unfinished), Middleware(Guard, settings=settings)],
                     exception_handlers={ApiError: on_api_error, HTTPException: on_http_error,
                                         ClientDisconnect: on_disconnect, Exception: on_bug})
