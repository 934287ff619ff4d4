"""`build-llm chat`: a terminal conversation with an instruction-tuned checkpoint, and the inference
pieces every chat front end shares (the CLI, `serve`, the examples).

A ChatSession holds the messages and the sampling settings; each reply is generated from the
conversation rendered in the tokenizer's chat template, or the package's own format
(data/chat_template.py: chat_format), cut to the context window by dropping the oldest turns
(fit_conversation, fit_reply), and streamed piece by piece up to an end token or the template's end
of turn (stream_response). A reply may by default be as long as the context leaves after the
prompt. `respond` is the whole reply at once.
"""

from __future__ import annotations

import sys
from typing import Any, Iterator, Sequence, TextIO

import torch
import torch.nn as nn

from build_llm.data.chat_template import ChatFormat, chat_format, template_source
from build_llm.errors import UsageError
from build_llm.infer.generate import check_sampling, decodable_ids, decode_stream, stream
from build_llm.infer.load import load_decoder
from build_llm.store.finetuned import FINETUNE_FILE, read_finetune_meta, resolve_finetuned

HELP = "commands: /reset (forget the conversation), /temperature T, /top-k K|off, /help, /quit (or Ctrl-D)"


def fit_conversation(messages: list[dict[str, str]], fmt: ChatFormat, budget: int) -> tuple[list[int], int]:
    """Prompt ids for the conversation in the chat format `fmt` (ending where the assistant's reply
    begins) in at most `budget` tokens, dropping the oldest user/assistant turns as needed; returns
    (ids, turns dropped)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    dropped = 0
    while True:
        ids = fmt.prompt(system + turns)
        if len(ids) <= budget:
            return ids, dropped
        if len(turns) <= 1:
            raise UsageError(f"the message is {len(ids)} tokens with its prompt, more than the {budget} the "
                             "context window leaves; send a shorter message")
        turns, dropped = turns[2:], dropped + 1


def reply_room(context: int) -> int:
    """The room kept for a reply of unstated length when old turns can be dropped to make it."""
    return min(256, context // 2)


def fit_reply(messages: list[dict[str, str]], fmt: ChatFormat, context: int, max_new_tokens: int | None
              ) -> tuple[list[int], int, int]:
    """(prompt ids, turns dropped, reply length) for a conversation in a `context`-token window.

    With `max_new_tokens`, the prompt gets what it leaves. Without, the oldest turns are dropped to
    keep reply_room(context) for the reply; a newest message longer than that is kept alone while it
    leaves a token; the reply may take all that the prompt leaves."""
    if max_new_tokens is not None:
        ids, dropped = fit_conversation(messages, fmt, context - max_new_tokens)
        return ids, dropped, max_new_tokens
    try:
        ids, dropped = fit_conversation(messages, fmt, context - reply_room(context))
    except UsageError:
        system = messages[:1] if messages[0]["role"] == "system" else []
        ids, _ = fit_conversation(system + messages[-1:], fmt, context - 1)
        dropped = (len(messages) - len(system) - 1) // 2
    return ids, dropped, context - len(ids)


def stream_response(model: nn.Module, tokenizer: Any, prompt_ids: list[int], stop_ids: Sequence[int],
                    max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                    generator: torch.Generator | None = None) -> Iterator[str]:
    """Yield the response text piece by piece as tokens are generated, up to the first of `stop_ids`
    (the end token, or the template's end of turn; not included). Text is yielded only up to whole
    characters (a byte-level BPE can split a character)."""
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    stops = set(stop_ids)

    def new_ids() -> Iterator[int]:
        for token in stream(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                            vocab_size=decodable_ids(model, tokenizer)):
            if int(token[0, 0]) in stops:
                return
            yield int(token[0, 0])

    yield from decode_stream(tokenizer, new_ids())


def respond(model: nn.Module, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int | None = None,
            **sampling: Any) -> str:
    """The model's whole (greedy by default) reply to a conversation ending with a user message, at most
    `max_new_tokens` long (default: what the context leaves after the prompt), in the tokenizer's chat
    template (or the package's own format)."""
    fmt = chat_format(tokenizer)
    ids, _, length = fit_reply(messages, fmt, model.cfg.context_length, max_new_tokens)
    return "".join(stream_response(model, tokenizer, ids, fmt.stop_ids, length, **sampling))


class ChatSession:
    def __init__(self, model: Any, tokenizer: Any, *, system: str | None = None, max_new_tokens: int | None = None,
                 temperature: float = 0.0, top_k: int | None = None, seed: int = 0) -> None:
        check_sampling(temperature, top_k, None)
        context = model.cfg.context_length
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                           or not 1 <= max_new_tokens < context):
            raise UsageError(f"max_new_tokens={max_new_tokens!r} is invalid; expected an integer in [1, {context - 1}] "
                             f"(the context window is {context} tokens and the prompt needs room)")
        self.model, self.tokenizer, self.format = model, tokenizer, chat_format(tokenizer)
        self.system = [{"role": "system", "content": system}] if system else []
        # max_new_tokens None: each reply may take what the context leaves after its prompt
        self.max_new_tokens, self.temperature, self.top_k = max_new_tokens, temperature, top_k
        self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        self.turns: list[dict[str, str]] = []
        self.dropped = 0  # turns dropped to fit the context window by the last reply

    def reset(self) -> None:
        self.turns = []

    def reply(self, text: str) -> Iterator[str]:
        """Stream the reply to the user message `text`; afterwards the exchange is in the conversation
        and `dropped` says how many old turns were dropped to fit the context window."""
        messages = self.system + self.turns + [{"role": "user", "content": text}]
        ids, self.dropped, length = fit_reply(messages, self.format, self.model.cfg.context_length,
                                              self.max_new_tokens)
        self.turns = self.turns[2 * self.dropped:]
        pieces: list[str] = []
        try:
            for piece in stream_response(self.model, self.tokenizer, ids, self.format.stop_ids, length,
                                         temperature=self.temperature, top_k=self.top_k, generator=self.generator):
                pieces.append(piece)
                yield piece
        finally:  # also when the reader stops early (Ctrl-C): keep what was said
            self.turns += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]


def load_chat_model(checkpoint: str, dtype: str | None = None) -> tuple[Any, Any, str | None]:
    """(model, tokenizer, note) of an instruction fine-tune (a LoRA run's adapter merged in memory) or a chat
    model (a checkpoint whose tokenizer has a chat template), or of a plain checkpoint with a note. With
    `dtype`, ready for decoding in it (see load.load_decoder)."""
    try:
        path = resolve_finetuned(checkpoint)
    except ValueError:
        model, tokenizer = load_decoder(checkpoint, dtype=dtype)
        if tokenizer is None:
            raise UsageError(f"checkpoint {str(checkpoint)!r} has no tokenizer.json; it cannot encode text") from None
        if template_source(tokenizer) is not None:
            return model, tokenizer, None
        return model, tokenizer, (f"note: {checkpoint} is not instruction-tuned (no {FINETUNE_FILE}) "
                                  "and has no chat template; its replies continue the prompt text")
    if read_finetune_meta(path)["task"] != "instruct":
        raise UsageError(f"--checkpoint {checkpoint!r} is a classifier; use `build-llm classify`")
    model, tokenizer = load_decoder(path, dtype=dtype)
    return model, tokenizer, None


def _command(session: ChatSession, line: str, err: TextIO) -> bool:
    """Apply a /command; False for /quit."""
    name, _, value = line.partition(" ")
    value = value.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        session.reset()
        print("(conversation cleared)", file=err, flush=True)
    elif name == "/temperature":
        try:
            t = float(value)
            if not t >= 0:
                raise ValueError
        except ValueError:
            print(f"(/temperature needs a number >= 0, got {value!r})", file=err, flush=True)
        else:
            session.temperature = t
            print(f"(temperature {t:g})", file=err, flush=True)
    elif name == "/top-k":
        if value in ("off", "0", "none"):
            session.top_k = None
            print("(top-k off)", file=err, flush=True)
        elif value.isdigit() and int(value) >= 1:
            session.top_k = int(value)
            print(f"(top-k {session.top_k})", file=err, flush=True)
        else:
            print(f"(/top-k needs an integer >= 1 or 'off', got {value!r})", file=err, flush=True)
    else:
        print(f"({HELP})", file=err, flush=True)
    return True


def run_chat(checkpoint: str, *, prompt: str | None = None, system: str | None = None,
             max_new_tokens: int | None = None, temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
             stdin: TextIO | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
    """`build-llm chat`: with `prompt`, print one reply; otherwise read messages until /quit or end of input."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    model, tokenizer, note = load_chat_model(checkpoint)
    session = ChatSession(model, tokenizer, system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, seed=seed)
    if note:
        print(note, file=err, flush=True)
    if prompt is not None:
        for piece in session.reply(prompt):
            out.write(piece)
            out.flush()
        out.write("\n")
        return
    length = f"up to {max_new_tokens} tokens" if max_new_tokens else "as long as the context leaves"
    print(f"chatting with {checkpoint} ({model.cfg.context_length}-token context; replies {length}); {HELP}",
          file=err, flush=True)
    inp = stdin or sys.stdin
    if inp is sys.stdin and hasattr(inp, "reconfigure"):
        # A line that is not UTF-8 becomes lone surrogates, which the tokenizer refuses as one note for
        # that line, rather than a UnicodeDecodeError that ends the session (stdin is strict in most locales)
        inp.reconfigure(errors="surrogateescape")
    while True:
        out.write("you> ")
        out.flush()
        line = inp.readline()
        if not line:  # end of input (Ctrl-D)
            out.write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _command(session, line, err):
                return
            continue
        try:
            replies = session.reply(line)
            first = next(replies, None)  # fits the conversation to the window before anything is shown
        except ValueError as e:
            print(f"({e})", file=err, flush=True)
            continue
        if session.dropped:
            print(f"(dropped the {session.dropped} oldest turn(s) to stay within the "
                  f"{model.cfg.context_length}-token context window)", file=err, flush=True)
        out.write("bot> ")
        try:
            for piece in ([first] if first is not None else []):
                out.write(piece)
                out.flush()
            for piece in replies:
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            replies.close()
            out.write(" (stopped)")
        out.write("\n")
        out.flush()
