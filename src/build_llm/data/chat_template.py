"""Chat formats: a conversation -> the prompt's token ids in the model's own format, which tokens are
the assistant's (trained on), and which ids end a reply.

A tokenizer with a chat template (a model imported from Hugging Face: data/special_tokens.py) gets a
`JinjaChat`: the template is rendered as `transformers`' `apply_chat_template` renders it (Jinja with
trim_blocks and lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, its `tojson`, the
special tokens, `add_generation_prompt`), and the text is encoded with special tokens' literal text
becoming their ids, as transformers does (no special tokens added around it). A tokenizer without one
gets the package's own format, `AlpacaChat` (data/instruct.py: the book's Alpaca prompt).

A template from a downloaded model is untrusted input: it runs in Jinja's immutable sandbox (no
attribute of Python's internals, no mutation of what it is given, no file or network access; it sees
only plain strings, lists and dicts), a repetition or power that would build a huge value is
refused, and so is a rendering that grows past any prompt's size or runs for seconds. Whatever goes
wrong in a template is one UsageError naming it.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from functools import lru_cache
from typing import Any, Iterator, Sequence

from build_llm.data.instruct import encode_conversation
from build_llm.errors import UsageError

MAX_REPEAT = 1 << 20  # characters or items a template may build with `*`; templates need a few dozen
# A rendered prompt must fit a model's context (131,072 tokens is some 0.5M characters): far beyond these is
# a template looping without end (nested loops of the sandbox's 100,000-item ranges), stopped as it renders.
MAX_RENDER_CHARS, MAX_RENDER_SECONDS = 1 << 24, 10.0
# What a failing template can raise while rendering, besides Jinja's TemplateError (its own raise_exception
# raises one, and the sandbox's refusals are one).
RENDER_ERRORS = (ArithmeticError, LookupError, TypeError, ValueError, AttributeError, RecursionError)


def _jinja() -> Any:
    """jinja2, imported with the first template, not with this module: it is the largest import of
    `build-llm`'s start after torch and numpy, and most commands render no template."""
    import jinja2.ext  # deferred: slow to import (see the docstring), only a chat template needs it
    import jinja2.nodes  # deferred: as above
    import jinja2.sandbox  # deferred: as above

    return jinja2


@lru_cache(maxsize=1)
def _environment() -> Any:
    """Jinja's immutable sandbox as transformers configures its environment, with `*` and `**` unable to
    build values that exhaust memory, and transformers' `{% generation %}` tag."""
    jinja2 = _jinja()

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: transformers marks the assistant's text with it; the
        text renders unchanged (we find the assistant's text ourselves, see JinjaChat.response_spans)."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    class TemplateSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(right, int) and abs(right) > 1024 and isinstance(left, int) \
                    and abs(left) > 1:
                raise jinja2.exceptions.SecurityError(f"the power {left} ** {right} is too large for a chat template")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                        raise jinja2.exceptions.SecurityError(f"repeating {len(seq)} items {n} times is too large "
                                                              "for a chat template")
            return super().call_binop(context, operator, left, right)

    env = TemplateSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


def _raise_exception(message: Any) -> None:
    raise _jinja().exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' tojson: plain json.dumps (Jinja's own escapes <, >, & and ' for HTML, which would
    # change the prompt) with non-ASCII kept
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def compile_template(source: str) -> Any:
    """The template (a jinja2.Template) compiled in the sandbox."""
    try:
        return _environment().from_string(source)
    except _jinja().TemplateError as e:
        where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise UsageError(f"the chat template is not valid Jinja{where}: {e}") from None


def _plain(value: Any) -> Any:
    """Only JSON's types reach the template (a str subclass could carry methods the sandbox allows)."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _bounded(pieces: Iterator[str]) -> str:
    """The text of a template's output pieces, refused once it passes MAX_RENDER_CHARS or takes longer
    than MAX_RENDER_SECONDS (checked at each piece: each loop iteration that writes yields one)."""
    out, size, deadline = [], 0, time.monotonic() + MAX_RENDER_SECONDS
    for piece in pieces:
        out.append(piece)
        size += len(piece)
        if size > MAX_RENDER_CHARS:
            raise _jinja().exceptions.SecurityError(f"the chat template renders longer than {MAX_RENDER_CHARS} "
                                                    "characters")
        if time.monotonic() > deadline:
            raise _jinja().exceptions.SecurityError(f"the chat template renders longer than {MAX_RENDER_SECONDS} s")
    return "".join(out)


class JinjaChat:
    """A Hugging Face chat template over a BPETokenizer (see the module's docstring)."""

    def __init__(self, tokenizer: Any, source: str) -> None:
        self.tokenizer, self.source = tokenizer, source
        self.template = compile_template(source)
        self._stop_ids: tuple[int, ...] | None = None

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The conversation as the template's text (transformers' apply_chat_template(tokenize=False))."""
        # transformers drops keys whose value is None (a template tests for a key, not for None)
        messages = [{k: _plain(v) for k, v in m.items() if v is not None} for m in messages]
        # tools and documents are None, not undefined: `{% if tools is not none %}` must be false
        context = {**self.tokenizer.config.special_tokens_map(), "messages": messages, "tools": None,
                   "documents": None, "add_generation_prompt": bool(add_generation_prompt)}
        try:
            return _bounded(self.template.generate(**context))
        except (_jinja().TemplateError, *RENDER_ERRORS) as e:
            raise UsageError(f"the chat template failed on this conversation: {' '.join(str(e).split())[:300]}"
                             f" ({type(e).__name__})") from None

    def prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of the conversation ending where the assistant's reply begins (apply_chat_template's
        with add_generation_prompt): what a chat generates from."""
        return self.tokenizer.encode(self.render(messages, add_generation_prompt=True))

    def encode(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False
               ) -> tuple[list[int], list[bool]]:
        """Token ids of the rendered conversation and, per token, whether it is the assistant's reply
        (its text and the end-of-turn token after it: what instruction fine-tuning trains on)."""
        text = self.render(messages, add_generation_prompt)
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        spans = self.response_spans(text, messages)
        return ids, [any(s < end and start < e for s, e in spans) for start, end in offsets]

    def response_spans(self, text: str, messages: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
        """Character spans of the assistant's replies in `text`, each with the end-of-turn token after it.

        A reply starts where the conversation before it, rendered with the generation prompt, ends
        (when the template renders that prefix unchanged; else after the previous reply), at its content."""
        spans: list[tuple[int, int]] = []
        cursor = 0
        for k, m in enumerate(messages):
            if m.get("role") != "assistant" or not m.get("content"):
                continue
            try:
                prompt = self.render(messages[:k], add_generation_prompt=True)
            except UsageError:  # a template that refuses a conversation ending there
                prompt = None
            start = len(prompt) if prompt is not None and text.startswith(prompt) else cursor
            content = str(m["content"])
            at = text.find(content, start)
            if at < 0:
                content = content.strip()
                at = text.find(content, start)
            if at < 0:
                raise UsageError(f"the chat template does not render assistant message {k + 1}'s text as it is "
                                 "given, so the reply's tokens cannot be told apart for training")
            end = at + len(content)
            end += next((len(t) for t in self.stop_texts() if text.startswith(t, end)), 0)
            spans.append((at, end))
            cursor = end
        return spans

    def stop_texts(self) -> list[str]:
        names = {i: t for t, i in self.tokenizer.added_tokens.items()}
        return [names[i] for i in self.stop_ids if i in names]

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The tokenizer's end ids and the template's end-of-turn token (the added token right after a
        reply: <|im_end|>, <|eot_id|>, <end_of_turn>), which a chat model ends its reply with."""
        if self._stop_ids is None:
            ids = list(self.tokenizer.stop_ids)
            probe = "Quite so."
            try:
                text = self.render([{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": probe}])
            except UsageError:  # a template that wants another conversation: the tokenizer's ids alone
                text = ""
            after = text[text.find(probe) + len(probe):] if probe in text else ""
            turn_end = [i for t, i in self.tokenizer.added_tokens.items() if t and after.startswith(t)]
            self._stop_ids = tuple(dict.fromkeys(ids + turn_end[:1]))
        return self._stop_ids


class AlpacaChat:
    """The package's own format (data/instruct.py) over any tokenizer with an end token."""

    def __init__(self, tokenizer: Any) -> None:
        eos = getattr(tokenizer, "eos_id", None)
        if eos is None:
            raise UsageError(f"the tokenizer ({type(tokenizer).__name__}) has no end token (<|endoftext|>) and no "
                             "chat template; instruction fine-tuning appends the end token to every response: use "
                             "a GPT-2 or trained BPE tokenizer")
        self.tokenizer, self.eos_id, self.stop_ids = tokenizer, eos, (eos,)

    def encode(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False
               ) -> tuple[list[int], list[bool]]:
        return encode_conversation(messages, self.tokenizer, self.eos_id, add_generation_prompt)

    def prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        return self.encode(messages, add_generation_prompt=True)[0]


ChatFormat = JinjaChat | AlpacaChat


def template_source(tokenizer: Any) -> str | None:
    """The tokenizer's own chat template (Jinja source), or None."""
    config = getattr(tokenizer, "config", None)
    return None if config is None else config.template_source()


def chat_format(tokenizer: Any) -> JinjaChat | AlpacaChat:
    """The tokenizer's chat template when it has one, else the package's own format."""
    source = template_source(tokenizer)
    return JinjaChat(tokenizer, source) if source is not None else AlpacaChat(tokenizer)
