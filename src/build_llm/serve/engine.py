"""Continuous batching: many sequences decoded together, one token per sequence per step.

One background thread owns the model. Each sequence is a `Sequence` holding its prompt, its sampling
settings and a callback. The thread runs a loop of steps; at each step boundary it

1. drops sequences that finished or were cancelled (their slot goes to the last active row, whose
   cache rows are copied in, so that the active rows are always slots 0 .. n-1),
2. admits waiting sequences while there are free slots: their prompts run together, in one forward
   (right-padded), into their slots of the shared KV cache (a prompt whose logprobs are echoed runs
   alone, as it needs its own logits),
3. decodes one token for every active row in one forward over the batch: row b's new token sits at
   its own position (per-row positions in the KV cache, see `KVCache.over`), so rows of different
   lengths share the matrix products and each row attends only to its own keys.

The weights are read once per step for all rows, which is where batching's throughput comes from.
A row's tokens are those it would get alone: the per-row attention mask hides every other row's
keys, and greedy decoding depends only on the row's own logits.

A failure is its own sequence's: one whose sampling, logprobs or echoed prompt fails is told
("error", message) and leaves at the next step boundary while the others go on; only a forward over
the whole batch that fails errors every row in it.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from build_llm.attention import KVCache
from build_llm.errors import UsageError
from build_llm.infer.generate import MIN_TEMPERATURE, argmax_rows, filter_logits
from build_llm.runtime import decoding_threads, one_thread
from build_llm.sizing import count_weights


class QueueFull(Exception):
    """The waiting queue is at its limit: the caller should answer 503."""


@dataclass
class Token:
    """One generated (or, with echo, prompt) token as the callback receives it."""

    id: int
    logprob: float | None = None  # log P(token | context) under the model (None: first prompt token)
    top: list[tuple[int, float]] | None = None  # the most likely alternatives (id, logprob)


@dataclass
class Sequence:
    """One sequence to decode. `emit(kind, payload)` is called from the engine thread with
    ("prompt", list[Token]) once when echo is set, ("token", Token) per new token, then
    ("done", "length" | "stop" | "cancelled") or ("error", message)."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[str, object], None]
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    logprobs: int | None = None  # how many alternatives to report per token (None: no logprobs)
    echo: bool = False  # report the prompt's own tokens with their logprobs
    stop_ids: frozenset[int] = frozenset()  # ids that end the sequence (reported, then it stops)
    cancelled: bool = False
    failed: bool = False  # an error was reported: the caller hears nothing more
    generated: int = field(default=0, init=False)
    last: int = field(default=0, init=False)
    generator: torch.Generator | None = field(default=None, init=False)

    def cancel(self) -> None:
        """Ask the engine to drop this sequence at its next step boundary (thread-safe)."""
        self.cancelled = True


def token_info(logits: torch.Tensor, token: int, top: int | None) -> Token:
    """Token `token` with its logprob and the `top` most likely alternatives under `logits` (V,)."""
    if top is None:
        return Token(token)
    logp = torch.log_softmax(logits.float(), dim=-1)
    alternatives = None
    if top > 0:
        values, ids = logp.topk(min(top, len(logp)))  # no more alternatives than the vocabulary has
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return Token(token, float(logp[token]), alternatives)


def fail(s: Sequence, e: Exception) -> None:
    """Report `e` to `s`'s caller alone and mark `s` to leave the batch; the other rows go on."""
    s.failed = s.cancelled = True
    try:
        s.emit("error", f"{type(e).__name__}: {e}")
    except Exception:  # a caller that cannot be told (its event loop closed): nothing more to do
        pass


class Engine:
    """The decoding loop over a model prepared for decoding (eval mode, any decoding dtype)."""

    def __init__(self, model: nn.Module, max_batch: int = 8, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 1:
            raise UsageError(f"max_batch={max_batch}, max_queue={max_queue}: both must be >= 1")
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.context_length = model.cfg.context_length
        # The ids it may produce and report: a caller whose tokenizer has fewer ids than the model's embedding has
        # rows (a padded embedding, as Qwen's) lowers it, and the padding's logits are then never drawn from.
        self.vocab_size = model.cfg.vocab_size
        self.cache = model.new_cache(max_batch)  # (L, slots, nh, ctx, hs), allocated once
        self.rows: list[Sequence] = []  # active sequences; rows[i] lives in cache slot i
        self.lengths: list[int] = []  # tokens of rows[i] already in the cache
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.steps = 0
        self.copies = 0  # rows moved between cache slots (see retire)
        # Each batch size's own decoding_threads (set in run): a timed choice of thread count compares steps of
        # one size, as a 16-row step takes several times a 1-row step's time on any count.
        self.step_threads: dict[int, Callable] = {}
        self.weights = count_weights(model)
        self.compiled = getattr(model, "decode_step", None) is not None  # its own pool: every thread, not timed
        self.thread = threading.Thread(target=self.run, name="build-llm-engine", daemon=True)

    # --- the caller's side (any thread) ---------------------------------------------------------
    def start(self) -> "Engine":
        self.thread.start()
        return self

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue sequences (all or none); QueueFull when the queue cannot take them all."""
        for s in seqs:
            if len(s.prompt) < 1 or len(s.prompt) + s.max_tokens > self.context_length:
                raise UsageError(f"a prompt of {len(s.prompt)} tokens plus max_tokens={s.max_tokens} must fit "
                                 f"in the context of {self.context_length} tokens")
        with self.wake:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            # Sequences cancelled while they waited (their clients went away) hold no place: while every row
            # decodes on, nothing pops them, and counting them would turn away the clients still here.
            gone = [s for s in self.waiting if s.cancelled]
            if gone:
                self.waiting = collections.deque(s for s in self.waiting if not s.cancelled)
            full = len(self.waiting) + len(seqs) > self.max_queue
            if not full:
                self.waiting.extend(seqs)
                self.wake.notify()
        for s in gone:  # as the engine's thread tells a cancelled sequence it pops
            with contextlib.suppress(Exception):  # a caller that cannot be told is not this caller's failure
                s.emit("done", "cancelled")
        if full:
            raise QueueFull(f"the queue is full ({self.max_queue} waiting sequences)")

    def stop(self, timeout: float | None = 10.0) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def load(self) -> dict[str, int]:
        with self.wake:  # the engine's thread pops from the queue meanwhile
            waiting = sum(not s.cancelled for s in self.waiting)  # the clients still waiting (see submit)
        return {"active": len(self.rows), "waiting": waiting, "max_batch": self.max_batch,
                "max_queue": self.max_queue, "steps": self.steps}

    # --- the engine thread ----------------------------------------------------------------------
    def run(self) -> None:
        # In this thread (thread counts are per thread), each step on its batch size's count (see step_threads).
        with torch.inference_mode():
            while True:
                with self.wake:
                    while not self.stopping and not self.waiting and not self.rows:
                        self.wake.wait()
                    if self.stopping:
                        break
                try:
                    self.step()
                except Exception as e:  # the batch's forward failed: every row in flight gets the error
                    for s in self.rows:
                        fail(s, e)
                    self.rows, self.lengths = [], []
        for s in self.rows + list(self.waiting):
            s.emit("done", "cancelled")

    def step(self) -> None:
        self.retire()
        admitted: list[Sequence] = []
        while len(self.rows) + len(admitted) < self.max_batch:
            with self.wake:
                if not self.waiting:
                    break
                s = self.waiting.popleft()
            if s.cancelled:
                s.emit("done", "cancelled")
            elif s.echo:
                try:
                    self.prefill_echo(s)
                except Exception as e:  # this sequence alone fails; it never joined the batch
                    fail(s, e)
            else:
                admitted.append(s)
        before = len(self.rows)
        try:
            self.prefill_together(admitted)
        except Exception as e:  # the admitted prompts fail together; the rows already decoding go on
            del self.rows[before:], self.lengths[before:]
            for s in admitted:
                fail(s, e)
        self.retire()
        if self.rows:
            self.decode()
            self.steps += 1

    def retire(self) -> None:
        """Drop finished rows, keeping the active ones in slots 0 .. n-1: finished rows at the end simply go, and
        each other finished row's slot takes the last active row (its cache rows copied in: `copies` counts them),
        so that rows finishing together (a batch of requests of one length) cost no copy."""
        done = []
        for s in self.rows:
            eos = s.generated > 0 and s.last in s.stop_ids
            finished = s.cancelled or eos or s.generated >= s.max_tokens
            if finished and not s.failed:
                s.emit("done", "cancelled" if s.cancelled else "stop" if eos else "length")
            done.append(finished)
        i = 0
        while True:
            while done and done[-1]:  # a finished last row: nothing to move
                done.pop(), self.rows.pop(), self.lengths.pop()
            while i < len(done) and not done[i]:
                i += 1
            if i >= len(done):
                return
            last = len(done) - 1  # active: it moves into the freed slot i
            n = self.lengths[last]
            self.cache.k[:, i, :, :n] = self.cache.k[:, last, :, :n]
            self.cache.v[:, i, :, :n] = self.cache.v[:, last, :, :n]
            self.copies += 1
            self.rows[i], self.lengths[i], done[i] = self.rows[last], self.lengths[last], False
            done.pop(), self.rows.pop(), self.lengths.pop()

    def prefill_echo(self, s: Sequence) -> None:
        """Admit `s`, whose prompt tokens are echoed with their logprobs, alone into the next free slot:
        the whole prompt runs, and its last logits give the first new token."""
        slot = len(self.rows)
        if s.seed is not None:
            s.generator = torch.Generator().manual_seed(s.seed)
        ids = torch.tensor([s.prompt], dtype=torch.long)
        logits = self.model(ids, cache=KVCache.over(self.cache.k[:, slot:slot + 1], self.cache.v[:, slot:slot + 1],
                                                    0))[0, :, :self.vocab_size]  # (T, V)
        tokens = [Token(s.prompt[0], None, None)]
        tokens += [token_info(logits[t], s.prompt[t + 1], s.logprobs if s.logprobs is not None else 0)
                   for t in range(len(s.prompt) - 1)]
        s.emit("prompt", tokens)
        if s.max_tokens > 0:  # the next token comes from the prompt's last logits, here
            s.last = self.sample(logits[-1], s)
            s.generated = 1
            s.emit("token", token_info(logits[-1], s.last, s.logprobs))
        self.rows.append(s)
        self.lengths.append(len(s.prompt))

    def prefill_together(self, seqs: list[Sequence]) -> None:
        """Admit `seqs` (no echo) into the next free slots with one forward over all their prompts,
        right-padded: row b's tokens sit at positions 0 .. len-1 of its own slot, and its padding after
        them is never attended to (each query sees keys up to its own position) and is overwritten
        by the row's later tokens. The prompt's last token is fed by the first decoding step, with
        every other row."""
        if not seqs:
            return
        slot = len(self.rows)
        bodies = [s.prompt[:-1] for s in seqs]
        width = max(len(b) for b in bodies)
        if width:
            ids = torch.zeros(len(seqs), width, dtype=torch.long)  # (n, T), 0 = padding
            for b, body in enumerate(bodies):
                ids[b, :len(body)] = torch.tensor(body, dtype=torch.long)
            start = torch.zeros(len(seqs), dtype=torch.long)  # every row from position 0
            self.model(ids, cache=KVCache.over(self.cache.k[:, slot:slot + len(seqs)],
                                               self.cache.v[:, slot:slot + len(seqs)], start),
                       last_only=True)  # only the cache is wanted: the head runs for one position, not width
        for s, body in zip(seqs, bodies):
            if s.seed is not None:
                s.generator = torch.Generator().manual_seed(s.seed)
            s.last = s.prompt[-1]
            self.rows.append(s)
            self.lengths.append(len(body))

    def decode(self) -> None:
        n = len(self.rows)
        pending = [i for i, s in enumerate(self.rows) if s.generated < s.max_tokens]
        if not pending:
            return
        idx = torch.tensor([[s.last] for s in self.rows], dtype=torch.long)  # (n, 1)
        pos = torch.tensor(self.lengths, dtype=torch.long)  # (n,) each row's next position
        if n not in self.step_threads:
            self.step_threads[n] = decoding_threads(self.weights, self.cache.k.device, compiled=self.compiled)
        with self.step_threads[n]():
            logits = self.model(idx, cache=KVCache.over(self.cache.k[:, :n], self.cache.v[:, :n],
                                                        pos))[:, -1, :self.vocab_size]  # (n, V)
        with one_thread():  # the server's other threads and its clients share the cores
            greedy = argmax_rows(logits)
            for i, s in enumerate(self.rows):
                self.lengths[i] += 1
                if s.generated >= s.max_tokens or s.cancelled:
                    continue
                try:
                    s.last = greedy[i] if s.temperature <= MIN_TEMPERATURE else self.sample(logits[i], s)
                    s.generated += 1
                    s.emit("token", token_info(logits[i], s.last, s.logprobs))
                except Exception as e:  # this row alone fails, and leaves at the next step boundary
                    fail(s, e)

    @staticmethod
    def sample(logits: torch.Tensor, s: Sequence) -> int:
        """The next token of `s` from its logits (V,): the argmax, or a draw from its tempered, filtered
        distribution by the inverse of the cumulative distribution at one uniform number from the row's
        generator (the same distribution as torch.multinomial, at a tenth of its cost over GPT-2's 50,257
        tokens: it was a quarter of a 16-row step's time)."""
        if s.temperature <= MIN_TEMPERATURE:  # 0 (or, from a caller that skipped the check, 0 in float32)
            return argmax_rows(logits[None])[0]
        logits = logits.float()
        scaled = (logits - logits.max()) / s.temperature  # shifted first: a tiny temperature cannot overflow
        probs = torch.softmax(filter_logits(scaled, s.top_k, s.top_p), dim=-1)
        if torch.isnan(probs).any():
            raise ValueError("the model's logits are NaN or infinite: its weights are damaged")
        cdf = probs.double().cumsum(0)  # (V,), float64: the last entry is 1 up to rounding
        u = torch.rand(1, dtype=torch.float64, generator=s.generator) * cdf[-1]  # in [0, total)
        # The first token whose cumulative probability exceeds u; a token of probability 0 never is.
        return min(int(torch.searchsorted(cdf, u, right=True)), len(cdf) - 1)
