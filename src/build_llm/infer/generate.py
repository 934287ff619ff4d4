"""Text generation: greedy, temperature, top-k and top-p sampling, with a KV cache and streaming.

With the cache, the prompt is run once and each new token costs one position's worth of compute.
GPT-2's positions are learned and absolute, so once the sequence is longer than the context the
window slides, every position shifts, and cached keys are stale: from there on each step recomputes
the window, exactly as `generate_text_simple` does. The tokens are the same either way.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn as nn

from build_llm.errors import UsageError
from build_llm.gpt import INT_DTYPES, GPTModel
from build_llm.runtime import decoding_threads, one_thread
from build_llm.sizing import count_weights


# Logits are divided by the temperature in float32 (after subtracting their maximum, so no quotient
# overflows to NaN). A temperature survives that division iff it is not 0 in float32: float32's smallest
# positive value is 2**-149, and anything above half of it rounds up to it rather than down to 0.
_F32_TINIEST = torch.finfo(torch.float32).smallest_normal * torch.finfo(torch.float32).eps  # 2**-149
MIN_TEMPERATURE = _F32_TINIEST / 2  # exclusive: the smallest valid temperature is the next float above it


def check_temperature(temperature: float) -> None:
    """The one rule for a temperature, for every front end (the CLI, the library, the server)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise UsageError(f"temperature={temperature!r} is invalid; expected a finite number >= 0 (0 is greedy)")
    if 0 < temperature <= MIN_TEMPERATURE:
        raise UsageError(f"temperature={temperature!r} is too small: it is 0 in float32, in which the logits are "
                         f"divided by it; expected 0 (greedy) or a temperature above {MIN_TEMPERATURE:.3g}")


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    check_temperature(temperature)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise UsageError(f"top_k={top_k!r} is invalid; expected None or an integer >= 1")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise UsageError(f"top_p={top_p!r} is invalid; expected a number in (0, 1] (or none: no cut)")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top k, then outside the smallest set of mass >= top_p."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p; the most likely always stays.
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop_sorted[..., 0] = False  # float rounding must not drop it when top_p is tiny
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """Each row's greedy token from logits (n, V): the first index of the row's largest value (or of its
    first NaN), as torch.argmax gives it, through NumPy's vectorised argmax (a tenth of torch's time on a CPU:
    0.08 against 0.84 ms for 16 rows of GPT-2's 50,257 logits, one thread). On another device, torch's argmax there,
    and one copy of the n ids to the host for all rows."""
    if logits.device.type != "cpu":
        return logits.argmax(dim=-1).tolist()
    x = logits.detach()
    if x.dtype not in (torch.float16, torch.float32, torch.float64):  # bfloat16, which NumPy lacks: exact in float32
        x = x.float()  # (float64 made float32 could tie two logits that differ, and pick another token)
    return x.numpy().argmax(axis=-1).tolist()


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B, 1) from last-position logits (B, V)."""
    nan = UsageError("the model's logits are NaN: its weights hold NaN or infinity (a damaged checkpoint or a "
                     "diverged run); load another checkpoint")
    if temperature == 0:  # argmax picks a NaN where there is one: checking the chosen logits checks them all
        chosen = (torch.tensor(argmax_rows(logits), dtype=torch.long)[:, None] if logits.device.type == "cpu"  # (B, 1)
                  else logits.argmax(dim=-1, keepdim=True))  # (no copy to the host on another device)
        if torch.isnan(logits.gather(-1, chosen)).any():
            raise nan
        return chosen
    if torch.isnan(logits).any():
        raise nan
    scaled = logits.float() / temperature
    if not torch.isfinite(scaled).all():  # a tiny temperature overflows: shift first (softmax is unchanged)
        scaled = (logits.float() - logits.float().amax(dim=-1, keepdim=True)) / temperature
        if torch.isnan(scaled).any():
            raise UsageError("the model's logits are infinite: its weights hold infinity; load another checkpoint")
    logits = filter_logits(scaled, top_k, top_p)
    probas = torch.softmax(logits, dim=-1)
    return torch.multinomial(probas, num_samples=1, generator=generator)


def _context_size(model: nn.Module, context_size: int | None) -> int:
    limit = model.cfg.context_length
    if context_size is None:
        return limit
    if isinstance(context_size, bool) or not isinstance(context_size, int) or not 1 <= context_size <= limit:
        raise UsageError(f"context_size={context_size!r} is invalid; expected an integer in [1, {limit}]")
    return context_size


def _check_idx(idx: Any) -> None:
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"idx: expected a torch.Tensor of token ids, got {type(idx).__name__}")
    if idx.ndim != 2 or idx.shape[1] < 1:
        raise UsageError(f"idx: expected shape (batch_size, n_tokens) with n_tokens >= 1, got {tuple(idx.shape)}")
    if idx.dtype not in INT_DTYPES:
        raise TypeError(f"idx: expected an integer dtype (e.g. torch.long), got {idx.dtype}")


def decodable_ids(model: nn.Module, tokenizer: Any) -> int:
    """How many ids a decoder may take and produce with `tokenizer`: ids 0 .. n-1, those both the model and the
    tokenizer know. The one rule for every front end (generate, chat, the server): an embedding may have rows past
    the tokenizer's last id (Qwen pads its vocabulary), which are no tokens, and decoding them fails."""
    return min(model.cfg.vocab_size, tokenizer.vocab_size)


def _check_vocab(idx: torch.Tensor, vocab_size: int | None) -> None:
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
        raise UsageError(f"vocab_size={vocab_size!r} is invalid; expected None or an integer >= 1 "
                         "(decodable_ids(model, tokenizer))")
    if vocab_size is not None and idx.numel() and not 0 <= int(idx.min()) <= int(idx.max()) < vocab_size:
        bad = sorted({i for i in idx.reshape(-1).tolist() if not 0 <= i < vocab_size})
        raise UsageError(f"idx holds token ids outside [0, {vocab_size}), which the tokenizer cannot decode: "
                         f"{bad[:5]}{' ...' if len(bad) > 5 else ''}")


def last_logits(model: nn.Module, idx: torch.Tensor, cache: Any = None) -> torch.Tensor:
    """The last position's logits (B, V): a GPTModel runs its head for that position alone; any other
    module (a test's stand-in, say) is called as the book calls it."""
    if isinstance(model, GPTModel):
        return model(idx, cache=cache, last_only=True)[:, -1, :]
    return (model(idx) if cache is None else model(idx, cache=cache))[:, -1, :]


def stream(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, *, context_size: int | None = None,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           eos_id: int | None = None, generator: torch.Generator | None = None,
           use_cache: bool | None = None, vocab_size: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the next tokens (B, 1) one step at a time; see `generate` for the arguments.

    Rows that have produced `eos_id` keep yielding `eos_id`; the stream ends when every row has.
    """
    _check_idx(idx)
    _check_vocab(idx, vocab_size)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UsageError(f"max_new_tokens={max_new_tokens!r} is invalid; expected an integer >= 0")
    check_sampling(temperature, top_k, top_p)
    ctx = _context_size(model, context_size)
    if use_cache is None:
        use_cache = not model.training
    idx = idx.long()
    # The cache holds what this call can reach, not the whole context: allocating (and zeroing) gpt2-small's 1,024
    # positions took 20 ms, longer than three tokens, for a 200-token answer that needs 206.
    cache = (model.new_cache(idx.shape[0], min(ctx, idx.shape[1] + max_new_tokens))
             if use_cache and idx.shape[1] < ctx else None)
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    # one CPU thread for each step of a small model; every thread for the compiled step (its own pool)
    threads = decoding_threads(count_weights(model), idx.device, compiled=getattr(model, "decode_step", None) is not None)

    with torch.inference_mode():
        for _ in range(max_new_tokens):
            with threads():
                if cache is not None and idx.shape[1] <= ctx:
                    new = idx[:, cache.pos:]  # the whole prompt first, then one token per step
                    logits = last_logits(model, new, cache)
                else:
                    cache = None  # the window slides: positions shift, cached keys are stale
                    logits = last_logits(model, idx[:, -ctx:])
            logits = logits[:, :vocab_size]  # (B, V): a padded embedding's last rows are never drawn
            with one_thread():  # a few vectors of the vocabulary's size: shared, they would wait for a busy core
                idx_next = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if eos_id is not None:
                idx_next = idx_next.masked_fill(finished[:, None], eos_id)
                finished |= idx_next[:, 0] == eos_id
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next
            if eos_id is not None and bool(finished.all()):
                return


def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, *, context_size: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, generator: torch.Generator | None = None,
             use_cache: bool | None = None, vocab_size: int | None = None) -> torch.Tensor:
    """Extend token ids `idx` (B, T) by up to `max_new_tokens`; returns (B, T + generated).

    temperature 0 is greedy (argmax); otherwise logits are divided by the temperature, cut to the
    `top_k` most likely and to the smallest set with probability >= `top_p`, and sampled with
    `generator`. Generation stops early once every row has produced `eos_id`. The KV cache is used
    when the model is in eval mode (override with `use_cache`); it gives the same tokens. With
    `vocab_size` (decodable_ids(model, tokenizer)), only ids below it are drawn and the prompt may hold
    only those; without, any of the model's ids.
    """
    new = list(stream(model, idx, max_new_tokens, context_size=context_size, temperature=temperature,
                      top_k=top_k, top_p=top_p, eos_id=eos_id, generator=generator, use_cache=use_cache,
                      vocab_size=vocab_size))
    return torch.cat([idx.long(), *new], dim=1)


def generate_text_simple(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int) -> torch.Tensor:
    """The book's greedy loop: recompute the last `context_size` tokens for every new token."""
    if not isinstance(model, nn.Module):
        raise TypeError("`model` must be a torch.nn.Module")
    _check_idx(idx)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UsageError(f"max_new_tokens={max_new_tokens!r} is invalid; expected an integer >= 0")
    if isinstance(context_size, bool) or not isinstance(context_size, int) or context_size <= 0:
        raise UsageError(f"context_size={context_size!r} is invalid; expected an integer > 0")

    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits_last = logits[:, -1, :]  # (B, T, V) -> (B, V)
        probas = torch.softmax(logits_last, dim=-1)
        idx_next = torch.argmax(probas, dim=-1, keepdim=True)  # (B, 1)
        idx = torch.cat((idx, idx_next), dim=1)  # (B, T+1)
    return idx


def decode_stream(tokenizer: Any, ids: Iterable[int], prefix: Sequence[int] = (), window: int = 64) -> Iterator[str]:
    """Text pieces, as the ids arrive, whose concatenation is `tokenizer.decode([*prefix, *ids])`:
    the prefix's text first, then the text each new id completes.

    A token can end inside a multi-byte character, which decodes to U+FFFD until a later token
    completes it; such a tail is held back, so no piece ever has to be taken back. Decoding all the
    ids at every step would cost time quadratic in their number, so once `window` ids decode to
    text that ends on a whole character, that text is settled and later steps decode only the ids
    after it (with one settled id before them as context). That is exact for tokenizers whose text
    is the concatenation of their tokens' texts (byte-level BPE, characters), which the first
    window checks at every split; any other tokenizer is decoded whole at every step.
    """
    so_far: list[int] = list(prefix)
    settled, settled_text = 0, ""  # so_far[:settled] decodes to settled_text, all of it shown
    shown = ""  # what has been yielded: settled_text plus part of the rest
    whole = False  # the tokenizer failed the concatenation check: decode everything, always

    def rest_text() -> str:
        """The text of so_far[settled:], decoded after one settled id (context for tokenizers that
        treat a first token specially)."""
        if settled == 0:
            return tokenizer.decode(so_far)
        head = tokenizer.decode(so_far[settled - 1:settled])
        text = tokenizer.decode(so_far[settled - 1:])
        return text[len(head):] if text.startswith(head) else tokenizer.decode(so_far)[len(settled_text):]

    def concatenative(text: str) -> bool:
        return all(head + tokenizer.decode(so_far[k:]) == text  # the splits among the last `window` ids
                   for k in range(max(1, len(so_far) - window), len(so_far))
                   if not (head := tokenizer.decode(so_far[:k])).endswith("\ufffd"))

    def new_text(final: bool) -> str:
        nonlocal settled, settled_text, shown, whole
        rest = tokenizer.decode(so_far)[len(settled_text):] if whole else rest_text()
        text = settled_text + (rest if final else rest.rstrip("\ufffd"))
        piece = ""
        if len(text) > len(shown) and text.startswith(shown):
            piece, shown = text[len(shown):], text
        if (not whole and len(so_far) - settled >= window and rest and not rest.endswith("\ufffd")
                and shown == settled_text + rest):
            if settled == 0 and not concatenative(rest):
                whole = True  # e.g. a first token decoded without its leading space
            else:
                settled, settled_text = len(so_far), shown
        return piece

    if piece := new_text(False):
        yield piece
    for i in ids:
        so_far.append(int(i))
        if piece := new_text(False):
            yield piece
    if piece := new_text(True):
        yield piece


def text_to_token_ids(text: str, tokenizer: Any) -> torch.Tensor:
    """Encode a prompt to a (1, T) LongTensor (tiktoken encodings may contain <|endoftext|>; a
    tokenizer that puts a start token before a text puts it first: Tokenizer.encode_prompt)."""
    if hasattr(tokenizer, "encode_ordinary"):  # a raw tiktoken Encoding, as in the book
        ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    elif hasattr(tokenizer, "encode_prompt"):
        ids = tokenizer.encode_prompt(text)
    else:
        ids = tokenizer.encode(text)
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer: Any) -> str:
    """Decode a (1, T) or (T,) tensor of ids."""
    return tokenizer.decode(token_ids.reshape(-1).tolist())
