import math
import random

import pytest
import tiktoken
import torch

from build_llm import (GPTConfig, GPTModel, generate, generate_text_simple, get_tokenizer, load_model, save_checkpoint,
                       stream)
from build_llm.data.tokenizer import BPETokenizer, CharTokenizer
from build_llm.gpt import use_decoding_layout
from build_llm.infer import kernels
from build_llm.infer.generate import argmax_rows, decode_stream, filter_logits, text_to_token_ids, token_ids_to_text
from build_llm.infer.quant import prepare_for_decoding
from build_llm.runtime import ONE_THREAD_BELOW


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("gpt2-small", n_layers=2, emb_dim=64, n_heads=4, vocab_size=50, context_length=12)
    m = GPTModel(cfg).eval()
    with torch.no_grad():  # larger logits: fewer near-ties, a sharper test of token identity
        m.out_head.weight.mul_(20)
    return m


def test_cached_greedy_equals_recomputation_also_past_the_context(model):
    idx = torch.randint(0, 50, (3, 4))
    cached = generate(model, idx, 30)  # 4 + 30 > context 12: the window slides
    uncached = generate(model, idx, 30, use_cache=False)
    seed_style = generate_text_simple(model, idx, 30, context_size=12)
    assert cached.shape == (3, 34)
    assert torch.equal(cached, uncached) and torch.equal(cached, seed_style)


def test_context_size_smaller_than_the_model_context(model):
    idx = torch.randint(0, 50, (1, 3))
    assert torch.equal(generate(model, idx, 15, context_size=5), generate_text_simple(model, idx, 15, 5))


def test_prompt_longer_than_the_context_is_cropped(model):
    idx = torch.randint(0, 50, (2, 20))
    assert torch.equal(generate(model, idx, 5), generate_text_simple(model, idx, 5, 12))


def test_stream_yields_the_tokens_generate_returns(model):
    idx = torch.randint(0, 50, (2, 3))
    g = torch.Generator().manual_seed(5)
    streamed = torch.cat(list(stream(model, idx, 8, temperature=1.0, top_k=5, generator=g)), dim=1)
    again = generate(model, idx, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again[:, 3:], streamed)


def test_sampling_with_top_k_1_is_greedy(model):
    idx = torch.randint(0, 50, (2, 3))
    assert torch.equal(generate(model, idx, 10, temperature=0.7, top_k=1), generate(model, idx, 10))


def test_filter_logits_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [True, True, False, False, False]
    # smallest set with mass >= p: 0.5 -> {0}; 0.6 -> {0, 1}; 0.85 -> {0, 1, 2}; 0.86 -> four
    assert kept(filter_logits(logits, top_p=0.5)) == [True, False, False, False, False]
    assert kept(filter_logits(logits, top_p=0.6)) == [True, True, False, False, False]
    assert kept(filter_logits(logits, top_p=0.849)) == [True, True, True, False, False]
    assert kept(filter_logits(logits, top_p=0.86)) == [True, True, True, True, False]
    assert kept(filter_logits(logits, top_p=1.0)) == [True] * 5
    assert kept(filter_logits(logits, top_k=3, top_p=0.6)) == [True, True, False, False, False]


def test_sampling_frequencies_follow_the_renormalised_distribution():
    class Fixed(torch.nn.Module):  # a "model" whose next-token distribution is known exactly
        cfg = GPTConfig(vocab_size=4, context_length=4, emb_dim=4, n_heads=1, n_layers=1)
        def forward(self, idx, cache=None):
            return torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).expand(idx.shape[0], idx.shape[1], 4)
    fixed = Fixed()
    n = 20000
    g = torch.Generator().manual_seed(0)
    out = generate(fixed, torch.zeros(n, 1, dtype=torch.long), 1, temperature=1.0, top_k=2, generator=g, use_cache=False)
    freq = torch.bincount(out[:, 1], minlength=4).double() / n
    expected = torch.tensor([0, 0, 3 / 7, 4 / 7], dtype=torch.double)
    assert torch.all((freq - expected).abs() <= 4 * math.sqrt(0.25 / n))
    out = generate(fixed, torch.zeros(n, 1, dtype=torch.long), 1, temperature=2.0, generator=g, use_cache=False)
    freq = torch.bincount(out[:, 1], minlength=4).double() / n
    tempered = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.double).sqrt()
    assert torch.all((freq - tempered / tempered.sum()).abs() <= 4 * math.sqrt(0.25 / n))


def test_eos_stops_each_row_and_then_the_batch(model):
    idx = torch.randint(0, 50, (2, 3))
    free = generate(model, idx, 10)
    eos = int(free[0, 5])  # row 0 produces it at its 3rd new token
    out = generate(model, idx, 10, eos_id=eos)
    row1_hits = (free[1, 3:] == eos).nonzero()
    first_stop = [3, int(row1_hits[0]) + 1 if len(row1_hits) else 10]
    assert out.shape[1] == 3 + max(first_stop)
    assert torch.all(out[0, 6:] == eos) and torch.equal(out[0, :6], free[0, :6])


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": -1}, "max_new_tokens=-1"),
    ({"temperature": -0.5}, "temperature=-0.5"),
    ({"top_k": 0}, "top_k=0"),
    ({"top_p": 0.0}, "top_p=0.0"),
    ({"top_p": 1.5}, "top_p=1.5"),
    ({"context_size": 13}, r"context_size=13 is invalid; expected an integer in \[1, 12\]"),
])
def test_invalid_arguments(model, kwargs, message):
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(model, torch.zeros(1, 2, dtype=torch.long), args.pop("max_new_tokens"), **args)


def test_invalid_idx(model):
    with pytest.raises(TypeError):
        generate(model, [[1, 2]], 3)
    with pytest.raises(TypeError, match="integer dtype"):
        generate(model, torch.zeros(1, 2), 3)
    with pytest.raises(ValueError, match="batch_size, n_tokens"):
        generate(model, torch.zeros(2, dtype=torch.long), 3)
    with pytest.raises(TypeError):
        generate_text_simple("not a model", torch.zeros(1, 2, dtype=torch.long), 3, 4)
    with pytest.raises(ValueError, match="context_size=0"):
        generate_text_simple(model, torch.zeros(1, 2, dtype=torch.long), 3, 0)


def test_text_helpers_round_trip_with_tiktoken_and_ours():
    for tok in (get_tokenizer("gpt2"), tiktoken.get_encoding("gpt2")):
        ids = text_to_token_ids("Every effort moves you<|endoftext|>", tok)
        assert ids.shape == (1, 5) and int(ids[0, -1]) == 50256
        assert token_ids_to_text(ids, tok) == "Every effort moves you<|endoftext|>"


def test_decoding_layout_keeps_values_names_and_tokens(model, tmp_path):
    idx = torch.randint(0, 50, (2, 4))
    before, logits = generate(model, idx, 20), model(idx)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    use_decoding_layout(model)
    weight = model.trf_blocks[0].att.W_qkv.weight
    assert weight.shape == (192, 64) and weight.t().is_contiguous()  # (out, in) values, (in, out) memory
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(generate(model, idx, 20), before)
    torch.testing.assert_close(model(idx), logits, atol=1e-5, rtol=0)
    save_checkpoint(tmp_path / "ck", model)
    loaded = load_model(tmp_path / "ck")
    assert loaded.out_head.weight.t().is_contiguous()
    torch.testing.assert_close(loaded(idx), logits, atol=1e-5, rtol=0)


def test_decode_stream_pieces_add_up_and_never_split_a_character():
    tok = get_tokenizer("gpt2")
    text = "Ünïcode: 😀 and 世界, then ASCII."
    ids = tok.encode(text)
    assert "\ufffd" in tok.decode(ids[:ids.index(tok.encode(" 😀")[0]) + 1])  # the emoji spans several tokens
    pieces = list(decode_stream(tok, iter(ids[3:]), prefix=ids[:3]))
    assert "".join(pieces) == text and pieces[0] == tok.decode(ids[:3])
    assert not any("\ufffd" in p for p in pieces) and len(pieces) > len(ids) // 2
    # A text that really ends in an incomplete character still comes out whole at the end.
    cut = ids[:ids.index(tok.encode(" 😀")[0]) + 1]
    assert "".join(decode_stream(tok, iter(cut))) == tok.decode(cut)


class FirstTokenWithoutSpace:
    """A tokenizer whose text is not the concatenation of its tokens' (SentencePiece-like: a leading
    space is dropped from the first token)."""

    words = ["a", " b", " cd", "e", " f"]

    def decode(self, ids):
        return "".join(self.words[i] for i in ids).lstrip(" ")


@pytest.mark.parametrize("kind", ["gpt2", "char", "bpe", "first-token-without-space"])
def test_decode_stream_equals_decoding_everything(kind):
    rng = random.Random(0)
    text = "Ünïcode 😀 and 世界, then ASCII. " * 8
    if kind == "gpt2":
        tok = get_tokenizer("gpt2")
        ids = [rng.randrange(tok.vocab_size) for _ in range(300)] + tok.encode(text)  # random bytes too
    elif kind == "char":
        tok = CharTokenizer.from_text(text)
        ids = [rng.randrange(1, tok.vocab_size) for _ in range(300)]
    elif kind == "bpe":
        tok = BPETokenizer.train_from_texts([text], vocab_size=300)
        ids = [rng.randrange(tok.vocab_size) for _ in range(300)]
    else:
        tok = FirstTokenWithoutSpace()
        ids = [rng.randrange(5) for _ in range(300)]
    for window in (1, 8, 64):
        pieces = list(decode_stream(tok, iter(ids[5:]), prefix=ids[:5], window=window))
        assert "".join(pieces) == tok.decode(ids), (kind, window)
        assert len(pieces) > 100


def test_small_models_decode_on_one_thread_and_restore_the_count(monkeypatch):
    """runtime.decoding_threads: each step of a small model runs on one CPU thread, a larger model's on
    the count timed fastest; between steps (a paused stream) and afterwards the caller's count holds;
    OMP_NUM_THREADS turns it off."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    try:
        torch.manual_seed(0)
        small = GPTModel(GPTConfig.from_preset("r-abc")).eval()
        assert sum(p.numel() for p in small.parameters()) < ONE_THREAD_BELOW
        small.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
        tokens = stream(small, torch.tensor([[2]]), 3)
        next(tokens)
        assert torch.get_num_threads() == 2  # paused between steps: the caller's count
        list(tokens)
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        seen.clear()
        list(stream(small, torch.tensor([[2]]), 2))
        assert seen == [2, 2]
        monkeypatch.delenv("OMP_NUM_THREADS")
        layers = ONE_THREAD_BELOW // (12 * 256 * 256) + 1  # just above the rule's size
        big = GPTModel(GPTConfig.from_preset("gpt2-small", vocab_size=64, context_length=8, emb_dim=256, n_heads=4,
                                             n_layers=layers)).eval()
        assert sum(p.numel() for p in big.parameters()) >= ONE_THREAD_BELOW
        big.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
        seen.clear()
        list(stream(big, torch.tensor([[2]]), 3))
        # a larger model: the prompt on every thread, then steps timed on one thread and on every thread
        # (runtime.TimedThreads; tests/test_runtime.py checks the choice); the caller's count after
        assert seen == [2, 1, 2] and torch.get_num_threads() == 2
        if kernels.available():  # the compiled step: every step on every thread (the kernels' pool waits for no one)
            prepare_for_decoding(big, "int8")
            seen.clear()
            list(stream(big, torch.tensor([[2]]), 3))
            assert big.decode_step is not None and seen == [2, 2, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_prefill_runs_the_head_for_the_last_position_only(model):
    """Generation asks the model for the prompt's last logits alone: the head sees one position, and the
    tokens are those of the book's loop, which computes every position's logits."""
    seen = []
    hook = model.out_head.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    try:
        idx = torch.randint(0, 50, (2, 7))
        out = generate(model, idx, 3)
    finally:
        hook.remove()
    assert seen == [1, 1, 1]
    assert torch.equal(out, generate_text_simple(model, idx, 3, context_size=12))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_nan_logit_anywhere_is_one_clear_error(temperature):
    from build_llm.errors import UsageError
    from build_llm.infer.generate import sample_next
    logits = torch.tensor([[5.0, 1.0, 2.0, 0.5], [0.0, 9.0, 1.0, 2.0]])
    logits[1, 2] = float("nan")  # not the row's largest value: greedy must still see it
    with pytest.raises(UsageError, match="NaN"):
        sample_next(logits, temperature, generator=torch.Generator().manual_seed(0))
    assert sample_next(torch.nan_to_num(logits), 0.0).tolist() == [[0], [1]]


def test_the_cache_holds_only_the_positions_the_call_reaches(model, monkeypatch):
    sizes = []
    real = type(model).new_cache
    monkeypatch.setattr(type(model), "new_cache", lambda self, b, n=None: sizes.append(n) or real(self, b, n))
    idx = torch.randint(0, 50, (2, 3))
    short = generate(model, idx, 4)  # 3 + 4 positions of the context's 12
    long = generate(model, idx, 20)  # past the context: the whole context, then the window slides
    assert sizes == [7, 12]
    assert torch.equal(short, generate_text_simple(model, idx, 4, 12))
    assert torch.equal(long, generate_text_simple(model, idx, 20, 12))


def test_greedy_rows_take_torch_argmax_first_largest_and_nan():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    logits[1, 10] = logits[1, 20] = logits[1].max() + 1  # a tie: the first index
    logits[2, 7] = float("nan")  # a NaN: its index, as torch.argmax
    logits[3] = 0.0  # all equal: 0
    logits[4, -1] = float("inf")
    assert argmax_rows(logits) == torch.argmax(logits, dim=-1).tolist() == argmax_rows(logits)
    assert [argmax_rows(row[None])[0] for row in logits] == [int(torch.argmax(row)) for row in logits]
    assert argmax_rows(logits)[1:4] == [10, 7, 0]
    close = torch.tensor([[1.0, 1.0 + 1e-12, 0.5]], dtype=torch.float64)  # equal once rounded to float32
    assert argmax_rows(close) == torch.argmax(close, dim=-1).tolist() == [1]
    assert argmax_rows(close.bfloat16()) == [0]  # (bfloat16's tie: the first)


def test_greedy_on_an_empty_batch_gives_token_ids():
    from build_llm.infer.generate import sample_next
    chosen = sample_next(torch.zeros(0, 5), 0.0)  # NumPy's argmax of no rows: an empty list, not a float tensor
    assert chosen.shape == (0, 1) and chosen.dtype == torch.long
