"""OpenAI's wire format: requests parsed and checked, and one choice's tokens turned into its reply.

Every check raises `ApiError`, which the app answers as OpenAI's JSON error
(`{"error": {"message", "type", "param", "code"}}`) with the error's status.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from starlette.responses import JSONResponse

from build_llm.data.tokenizer import check_unicode
from build_llm.errors import UsageError
from build_llm.infer.generate import check_temperature
from build_llm.serve.engine import Sequence, Token


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
    chat_stop_ids: tuple[int, ...] = ()  # the ids that end a chat reply (the template's end of turn)
    # the Host names the server answers (None: any); see app.allowed_hosts
    allowed_hosts: frozenset[str] | None = None
    created: int = field(default_factory=lambda: int(time.time()))


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers  # e.g. a 503's Retry-After

    def body(self) -> dict[str, Any]:
        """OpenAI's error object: the JSON of the response, or of a stream's last event."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return ApiError(status, message, param, code, kind).response()


# --- request validation ----------------------------------------------------------------------------
def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


MAX_DEPTH = 64  # JSON nesting: OpenAI's requests need a few levels; Python's parser fails near 1000


def _depth_ok(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:  # not recursive: a deep value must not exhaust Python's stack here either
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        items = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1) for v in items if isinstance(v, (dict, list)))
    return True


def parse_json(raw: bytes) -> dict[str, Any]:
    too_deep = ApiError(400, f"the request body nests JSON more than {MAX_DEPTH} levels deep; send a flatter object",
                        code="invalid_json")
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)  # no NaN / Infinity
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object", code="invalid_json") from None
    except RecursionError:
        raise too_deep from None
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and not _depth_ok(body):  # the count: most bodies skip the walk
        raise too_deep
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
    max_tokens: int | None  # None: not given; the app gives what the context leaves (Api.fit)
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


# OpenAI's parameters this server does not implement, with the values that ask for nothing (what the client
# libraries and front ends send when the user set nothing). Any other value is refused, not ignored: the reply
# would silently not be the one asked for.
UNSUPPORTED = {"suffix": ("",), "best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,),
               "logit_bias": ({},), "response_format": ({"type": "text"},)}


def check_supported(body: dict) -> None:
    for key, neutral in UNSUPPORTED.items():
        value = body.get(key)
        if value is not None and value not in neutral:
            raise ApiError(400, f"{key}={str(value)[:60]} is not supported by this server; leave {key} out",
                           param=key, code="unsupported_parameter")


def parse_sampling(body: dict, settings: Settings, context_length: int, vocab_size: int | None = None) -> Sampling:
    check_supported(body)
    limit = settings.max_tokens or context_length
    max_tokens = _integer(body, "max_tokens", None, 0, limit)
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
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    with as_api_error("temperature"):
        check_temperature(temperature)  # not 0 in float32 unless it is 0
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options={options!r} is invalid; expected an object such as "
                            '{"include_usage": true}', param="stream_options")
    return Sampling(
        include_usage=_boolean(options, "include_usage"),
        max_tokens=max_tokens, temperature=temperature,
        top_p=None if top_p == 1.0 else top_p, top_k=top_k, n=_integer(body, "n", 1, 1, settings.max_n), stop=stop,
        seed=_integer(body, "seed", None, -(1 << 63), (1 << 63) - 1), stream=_boolean(body, "stream"),
        logprobs=_integer({"logprobs": logprobs}, "logprobs", None, 0,
                          min(settings.max_logprobs, vocab_size or settings.max_logprobs)),  # no more than exist
        echo=_boolean(body, "echo"), truncate=_boolean(body, "truncate"))


@contextmanager
def as_api_error(param: str) -> Iterator[None]:
    """A library rule's UsageError (the same rule as the CLI's), as the 400 it is on the wire."""
    try:
        yield
    except UsageError as e:
        raise ApiError(400, str(e), param=param) from None


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
            with as_api_error("prompt"):
                check_unicode(item, "prompt")  # JSON can spell a lone surrogate ("\ud800"), UTF-8 cannot
            try:
                ids = encode(item)
            except ValueError as e:  # e.g. a character a character-level vocabulary does not have
                raise ApiError(400, f"prompt cannot be encoded: {' '.join(str(e).split())}", param="prompt") from None
            if not ids:
                raise ApiError(400, "prompt is empty; give at least one token of text", param="prompt")
            out.append((ids, item))
        else:
            if any(not 0 <= i < vocab_size for i in item):
                raise ApiError(400, f"prompt holds token ids outside [0, {vocab_size})", param="prompt")
            out.append((list(item), None))
    return out


def _content_text(content: Any) -> str | None:
    """A message's text: the string, or the OpenAI format's list of parts ([{"type": "text", "text": ...}]),
    joined by newlines as vLLM hands them to a template that expects a string; None if it is neither."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content or not all(isinstance(p, dict) for p in content):
        return None
    other = next((p.get("type") for p in content if p.get("type") != "text"), None)
    if other is not None:
        raise ApiError(400, f"messages: a content part of type {str(other)[:40]!r} is not supported; this model "
                            "reads text parts only ({\"type\": \"text\", \"text\": ...})", param="messages")
    texts = [p.get("text") for p in content]
    return "\n".join(texts) if all(isinstance(t, str) for t in texts) else None


def parse_messages(body: dict) -> list[dict[str, str]]:
    """The chat's messages, each reduced to its role and text content; the last must be the user's."""
    for key in ("tools", "functions"):  # the template is rendered without them: refused, not ignored
        if body.get(key):
            raise ApiError(400, f"{key} are not supported: this server renders the chat template without tools; "
                                f"leave {key} out", param=key)
    messages = body.get("messages")
    texts = [_content_text(m.get("content")) if isinstance(m, dict) else None
             for m in (messages if isinstance(messages, list) else [])]
    if not isinstance(messages, list) or not messages or not all(
            t is not None and m.get("role") in ("system", "user", "assistant") for m, t in zip(messages, texts)
    ) or messages[-1]["role"] != "user":
        raise ApiError(400, "messages is invalid; expected a non-empty list of {\"role\": system|user|assistant, "
                            "\"content\": text or text parts} ending with the user's message", param="messages")
    with as_api_error("messages"):
        for t in texts:
            check_unicode(t, "messages")
    return [{"role": m["role"], "content": t} for m, t in zip(messages, texts)]


# --- one choice: tokens in, text and logprobs out ---------------------------------------------------
class StopScan:
    """The first stop string in a text that grows at its end, and how much of its end could still
    become one. A Knuth-Morris-Pratt matcher per stop string reads each new character once (amortised),
    so a long completion costs time in proportion to its length, however long the stop strings are;
    each failure table is built only as far as the text has matched its stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.matched = [0] * len(stops)  # per stop string: the longest end of the text that begins it
        self.tables: list[list[int]] = [[0] for _ in stops]  # per stop string: KMP's failure function
        self.scanned = 0  # characters of the text read so far

    @property
    def held(self) -> int:
        """How many of the text's last characters may still grow into a stop string."""
        return max(self.matched, default=0)

    def _table(self, j: int, upto: int) -> list[int]:
        """Stop string j's failure function, extended to cover its first `upto` characters."""
        s, table = self.stops[j], self.tables[j]
        while len(table) < upto:
            k = table[-1]
            while k and s[len(table)] != s[k]:
                k = table[k - 1]
            table.append(k + 1 if s[len(table)] == s[k] else 0)
        return table

    def feed(self, text: str, end: int) -> int | None:
        """Read `text[:end]` (whose start was read before): where the first stop string begins, or None."""
        hits = []
        for j, s in enumerate(self.stops):
            q = self.matched[j]
            for i in range(self.scanned, end):
                while q and s[q] != text[i]:
                    q = self._table(j, q)[q - 1]
                if s[q] == text[i]:
                    q += 1
                if q == len(s):
                    hits.append(i + 1 - q)
                    break
            self.matched[j] = q
        self.scanned = end
        return min(hits) if hits else None


class Choice:
    """Turns the engine's tokens for one sequence into OpenAI text, logprobs and a finish reason.

    Text goes out only when it is final: a trailing partial UTF-8 character, or a tail that could
    still grow into a stop string, is held back until the next token decides it.
    """

    def __init__(self, index: int, tokenizer: Any, stop: list[str], want_logprobs: bool,
                 stop_ids: frozenset[int] | None = None) -> None:
        self.index, self.tokenizer, self.want_logprobs = index, tokenizer, want_logprobs
        self.stop_ids = stop_ids or frozenset()  # the end token, or a chat template's end of turn
        self.ids: list[int] = []
        self.scan = StopScan(stop)
        self.text = ""  # final text of the completion so far (sent or to send)
        self.sent = 0
        self.prefix = ""  # the echoed prompt
        self.echoed = False  # the prefix has been streamed
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
        if token.id in self.stop_ids:
            self.finish = "stop"
            self.text = self.tokenizer.decode(self.ids)
            return
        if self.want_logprobs:
            self.add_logprobs([token], len(self.prefix) + len(self.tokenizer.decode(self.ids)))
        self.ids.append(token.id)
        full = self.tokenizer.decode(self.ids)
        keep = len(full.rstrip("\ufffd"))  # a character still being spelled out in bytes
        hit = self.scan.feed(full, keep)
        if hit is not None:
            self.text = full[:hit]
            self.finish = "stop"
            if self.seq is not None:
                self.seq.cancel()
            return
        keep -= self.scan.held  # a tail that may become a stop string
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
