"""What the model predicts next, in numbers: top-k tables, the distribution at several temperatures
with the sampler's cuts, and tokens made readable for tables and plots."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from build_llm.errors import UsageError
from build_llm.infer.generate import check_sampling, decodable_ids, filter_logits, text_to_token_ids


# --- readable tokens -----------------------------------------------------------------------------
_VISIBLE = {" ": "␣", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def token_label(text: str) -> str:
    """A token's text made visible for plots and tables: spaces as ␣, newlines as \\n, other
    control characters as escapes; an empty string (a pad id, a partial UTF-8 byte) as ∅."""
    if text == "":
        return "∅"
    return "".join(_VISIBLE.get(c) or (repr(c)[1:-1] if not c.isprintable() else c) for c in text)


def token_labels(tokenizer: Any, ids: list[int]) -> list[str]:
    """`token_label` of each id decoded on its own (a pad id shows its vocabulary entry, "<PAD>")."""
    labels = []
    for i in ids:
        text = tokenizer.decode([i])
        if text == "" and hasattr(tokenizer, "vocab"):
            text = tokenizer.vocab[i]
        labels.append(token_label(text))
    return labels


def token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """The text each token adds, so that the pieces join to `decode(ids)` exactly.

    Decoding ids one by one splits a character whose UTF-8 bytes span two GPT-2 tokens into two
    replacement characters; then the character is given to the token that completes it.
    """
    pieces = [tokenizer.decode([i]) for i in ids]
    whole = tokenizer.decode(ids)
    if "".join(pieces) == whole:
        return pieces
    pieces, done = [], 0
    for j in range(len(ids)):
        text = tokenizer.decode(ids[: j + 1])
        stable = text if j == len(ids) - 1 else text.rstrip("\ufffd")
        pieces.append(stable[done:])
        done = max(done, len(stable))
    return pieces


# --- the next token --------------------------------------------------------------------------------
def next_token_distribution(model: nn.Module, tokenizer: Any, prompt: str, k: int = 10) -> list[tuple[str, int, float]]:
    """Top-k (token string, id, probability) of the next token after `prompt` (eval mode), over the ids the
    tokenizer can decode (the distribution generation draws from: an embedding's padding rows are no tokens)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UsageError(f"k={k!r} is invalid; expected an integer >= 1")
    idx = text_to_token_ids(prompt, tokenizer)
    ctx = model.cfg.context_length
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(idx[:, -ctx:].to(model.tok_emb.weight.device), last_only=True)[0, -1]
    finally:
        model.train(was_training)
    probas = torch.softmax(logits[:decodable_ids(model, tokenizer)].float(), dim=-1)
    top = torch.topk(probas, min(k, probas.numel()))
    return [(tokenizer.decode([i]), i, p) for p, i in zip(top.values.tolist(), top.indices.tolist())]


def next_token_table(logits: torch.Tensor, tokenizer: Any, k: int = 10) -> list[tuple[str, int, float, float]]:
    """Top-k (label, id, probability, cumulative probability) of last-position logits (V,)."""
    probas = torch.softmax(logits.float(), dim=-1)
    top = torch.topk(probas, min(k, probas.numel()))
    ids, ps = top.indices.tolist(), top.values.tolist()
    cum = torch.tensor(ps).cumsum(0).tolist()
    return [(label, i, p, c) for label, i, p, c in zip(token_labels(tokenizer, ids), ids, ps, cum)]


def tempered_distributions(logits: torch.Tensor, temperatures: list[float], top_k: int | None = None,
                           top_p: float | None = None) -> list[dict[str, Any]]:
    """For each temperature T > 0: the softmax of logits / T over the whole vocabulary (`probs`), and
    which tokens the sampler keeps after the top-k and top-p cuts (`keep`, as `generate` does it)."""
    out = []
    for t in temperatures:
        check_sampling(t, top_k, top_p)
        if t == 0:
            raise UsageError("temperature=0 is greedy (the argmax); give temperatures > 0 to plot")
        scaled = logits.float() / t
        kept = filter_logits(scaled[None], top_k, top_p)[0]
        out.append({"temperature": t, "probs": torch.softmax(scaled, dim=-1), "keep": torch.isfinite(kept)})
    return out
