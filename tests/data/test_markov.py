"""Tests for build_llm.data.markov: the ABC source and its exact Bayes-optimal loss."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from build_llm.data.markov import (
    ABC,
    WordSource,
    abc_text,
    entropy_rate,
    next_char_distribution,
    optimal_loss,
    optimal_loss_on_text,
    optimal_loss_per_position,
    optimal_window_losses,
)
from build_llm.data import markov

NOTEBOOK_WORDS = ("AABCBBC", "BCABCCA", "CAAACB\n\n")  # voc <- c(...) in seed 003
NOTEBOOK_PROBS = (0.4, 0.4, 0.2)


def parse_words(text: str, words=NOTEBOOK_WORDS) -> list[int]:
    """Split a text back into word indices. The ABC words form a prefix code, so greedy matching is exact."""
    out, i = [], 0
    while i < len(text):
        for k, w in enumerate(words):
            if text.startswith(w, i):
                out.append(k)
                i += len(w)
                break
        else:
            raise AssertionError(f"text is not a concatenation of the words at index {i}: {text[i:i + 20]!r}")
    return out


@pytest.fixture(scope="module")
def long_abc() -> str:
    return ABC.sample(400_000, seed=12345)  # about 2.9 million characters


# --------------------------------------------------------------------------- the generator


def test_abc_matches_notebook():
    assert ABC.words == NOTEBOOK_WORDS
    assert ABC.probs == NOTEBOOK_PROBS
    assert ABC.alphabet == ("\n", "A", "B", "C")  # the notebook's vocabulary without <PAD>
    assert ABC.mean_word_length == pytest.approx(7.2)


def test_abc_text_default_is_150000_words_with_notebook_frequencies():
    text = abc_text()
    idx = parse_words(text)
    assert len(idx) == 150_000
    counts = np.bincount(idx, minlength=3)
    n = len(idx)
    for count, p in zip(counts, NOTEBOOK_PROBS):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(count - n * p) < 3 * sigma, (counts, p)


def test_abc_text_is_seeded():
    assert abc_text(1000, seed=7) == abc_text(1000, seed=7)
    assert abc_text(1000, seed=7) != abc_text(1000, seed=8)
    assert abc_text(1000) == abc_text(1000, seed=1)
    assert abc_text(0) == ""
    assert parse_words(abc_text(321, seed=3)).__len__() == 321


def test_sample_of_a_general_source():
    src = WordSource(["xy", "z"], [0.25, 0.75])
    text = src.sample(2000, seed=0)
    idx = parse_words(text, src.words)
    assert len(idx) == 2000
    assert abs(np.mean(np.array(idx) == 1) - 0.75) < 3 * math.sqrt(0.75 * 0.25 / 2000)


@pytest.mark.parametrize(
    "words, probs, exc, fragments",
    [
        ((), (), ValueError, ["words", "empty"]),
        (("A", ""), (0.5, 0.5), ValueError, ["words[1]", "''", "non-empty"]),
        (("A", 3), (0.5, 0.5), ValueError, ["words[1]", "3"]),
        ("AB", (0.5, 0.5), TypeError, ["words", "'AB'"]),
        (("A", "B"), (0.5,), ValueError, ["probs", "1 probabilities", "2 words"]),
        (("A", "B"), (0.5, 0.6), ValueError, ["probs", "1.1", "sum to 1"]),
        (("A", "B"), (1.5, -0.5), ValueError, ["probs[1]", "-0.5", "> 0"]),
        (("A", "B"), (1.0, 0.0), ValueError, ["probs[1]", "0.0", "> 0"]),
        (("A", "B"), (0.5, float("nan")), ValueError, ["probs[1]", "nan"]),
        (("A", "B"), (0.5, "0.5"), TypeError, ["probs[1]", "'0.5'", "number"]),
    ],
)
def test_invalid_sources_are_rejected_with_clear_messages(words, probs, exc, fragments):
    with pytest.raises(exc) as info:
        WordSource(words, probs)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_probs_sum_tolerance_and_normalised_fields():
    src = WordSource(["A", "B", "C"], np.array([1 / 3, 1 / 3, 1 / 3]))
    assert src.words == ("A", "B", "C") and isinstance(src.probs, tuple)
    hash(src)


@pytest.mark.parametrize("bad", [-1, 1.5, "10", True])
def test_sample_rejects_bad_n_words(bad):
    with pytest.raises(ValueError, match="n_words"):
        ABC.sample(bad, seed=0)


# --------------------------------------------------------------------------- exact optimum


def test_position_one_equals_hand_computed_bigram_entropy():
    # Stationary bigram: within-word pairs have weight p(w)/E[L]; across a boundary, w then w' has
    # weight p(w) p(w')/E[L].
    mean_len = sum(p * len(w) for w, p in zip(NOTEBOOK_WORDS, NOTEBOOK_PROBS))
    joint: dict[tuple[str, str], float] = {}
    for w, p in zip(NOTEBOOK_WORDS, NOTEBOOK_PROBS):
        for a, b in zip(w, w[1:]):
            joint[a, b] = joint.get((a, b), 0.0) + p / mean_len
        for w2, p2 in zip(NOTEBOOK_WORDS, NOTEBOOK_PROBS):
            key = (w[-1], w2[0])
            joint[key] = joint.get(key, 0.0) + p * p2 / mean_len
    assert sum(joint.values()) == pytest.approx(1.0)
    first: dict[str, float] = {}
    for (a, _), q in joint.items():
        first[a] = first.get(a, 0.0) + q
    h = -sum(q * math.log(q / first[a]) for (a, _), q in joint.items())
    assert optimal_loss_per_position(ABC, 1)[0] == pytest.approx(h, abs=1e-12)


def test_empty_context_gives_stationary_character_frequencies():
    dist = next_char_distribution(ABC, "")
    assert dist == pytest.approx({"\n": 0.4 / 7.2, "A": 2.2 / 7.2, "B": 2.2 / 7.2, "C": 2.4 / 7.2})


def all_contexts(source, t):
    """Every length-t context with positive probability, with that probability, using the chain rule."""
    level = [("", 1.0)]
    for _ in range(t):
        nxt = []
        for ctx, p in level:
            for c, q in next_char_distribution(source, ctx).items():
                if q > 0:
                    nxt.append((ctx + c, p * q))
        level = nxt
    return level


@pytest.mark.parametrize("source", [ABC, WordSource(["A", "AB", "B"], [0.3, 0.3, 0.4])])
def test_recursion_matches_brute_force_enumeration_of_contexts(source):
    values = optimal_loss_per_position(source, 5)
    for t in range(1, 6):
        h = 0.0
        for ctx, p in all_contexts(source, t):
            h -= sum(p * q * math.log(q) for q in next_char_distribution(source, ctx).values() if q > 0)
        assert values[t - 1] == pytest.approx(h, abs=1e-12), t


def block_entropy(ids: np.ndarray, k: int, base: int) -> float:
    codes = np.zeros(len(ids) - k + 1, dtype=np.int64)
    for j in range(k):
        codes = codes * base + ids[j : len(ids) - k + 1 + j]
    _, counts = np.unique(codes, return_counts=True)
    q = counts / counts.sum()
    return float(-(q * np.log(q)).sum())


def test_exact_optimum_agrees_with_empirical_conditional_entropy(long_abc):
    lookup = {c: i for i, c in enumerate(ABC.alphabet)}
    ids = np.array([lookup[c] for c in long_abc], dtype=np.int64)
    assert len(ids) > 2_000_000
    exact = optimal_loss_per_position(ABC, 7)
    h = [block_entropy(ids, k, len(lookup)) for k in range(1, 9)]
    for t in range(1, 8):
        plug_in = h[t] - h[t - 1]  # H(X_{t+1} | X_1..X_t) = H(X_1..X_{t+1}) - H(X_1..X_t)
        assert abs(plug_in - exact[t - 1]) < 0.005, (t, plug_in, exact[t - 1])


def test_values_are_non_increasing_and_converge_to_entropy_rate():
    values = optimal_loss_per_position(ABC, 64)
    assert np.all(np.diff(values) <= 1e-12)
    rate = entropy_rate(ABC)
    assert rate == pytest.approx((-2 * 0.4 * math.log(0.4) - 0.2 * math.log(0.2)) / 7.2)
    assert np.all(values >= rate - 1e-12)
    assert values[-1] == pytest.approx(rate, abs=1e-10)
    assert optimal_loss(ABC, 16) == pytest.approx(values[:16].mean(), abs=1e-15)
    assert values[0] > values[3] > values[-1]


def test_single_word_source_is_deterministic_after_enough_context():
    values = optimal_loss_per_position(WordSource(["AAB"], [1.0]), 10)
    assert values[0] > 0  # after "A" the model cannot tell offset 0 from offset 1
    np.testing.assert_allclose(values[1:], 0.0, atol=1e-12)
    assert entropy_rate(WordSource(["AAB"], [1.0])) == 0.0


def test_fair_coin_source_costs_ln2_everywhere():
    coin = WordSource(["A", "B"], [0.5, 0.5])
    np.testing.assert_allclose(optimal_loss_per_position(coin, 20), math.log(2), rtol=0, atol=1e-14)
    assert entropy_rate(coin) == pytest.approx(math.log(2))


def test_entropy_rate_of_sources_that_are_not_uniquely_decodable():
    assert not markov._is_uniquely_decodable(["A", "A", "B"])
    assert not markov._is_uniquely_decodable(["A", "AB", "B"])
    assert markov._is_uniquely_decodable(["0", "01", "11"])  # uniquely decodable but not a prefix code
    assert markov._is_uniquely_decodable(NOTEBOOK_WORDS)
    # A repeated word is the same as one word with the summed probability.
    assert entropy_rate(WordSource(["A", "A", "B"], [0.25, 0.25, 0.5])) == pytest.approx(math.log(2), abs=1e-9)
    assert entropy_rate(WordSource(["A", "AA"], [0.5, 0.5])) == pytest.approx(0.0, abs=1e-9)
    src = WordSource(["A", "AB", "B"], [0.3, 0.3, 0.4])
    rate = entropy_rate(src)
    naive = -sum(p * math.log(p) for p in src.probs) / src.mean_word_length
    assert rate < naive - 0.01  # "AB" and "A"+"B" look the same, so the text holds less information
    values = optimal_loss_per_position(src, 40)
    assert values[-1] >= rate - 1e-9 and values[-1] - rate < 1e-3


def test_uniquely_decodable_formula_agrees_with_recursion_bounds():
    src = WordSource(["0", "01", "11"], [0.5, 0.3, 0.2])
    chain = markov._chain(src)
    upper = markov._conditional_entropies(chain, chain.stationary[None, :])
    lower = markov._conditional_entropies(chain, np.diag(chain.stationary))
    for _ in range(200):
        hi, lo = next(upper), next(lower)
    rate = entropy_rate(src)
    assert lo - 1e-9 <= rate <= hi + 1e-9
    assert hi - lo < 1e-6


def test_long_contexts_are_cheap():
    start = time.perf_counter()
    values = optimal_loss_per_position(ABC, 256)
    assert time.perf_counter() - start < 5.0
    assert values.shape == (256,)


def test_bad_arguments_to_the_optimum():
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="context_length"):
            optimal_loss_per_position(ABC, bad)
    with pytest.raises(TypeError, match="source"):
        optimal_loss(("AB",), 4)


# --------------------------------------------------------------------------- concrete text


def test_next_char_distribution_examples_and_errors():
    dist = next_char_distribution(ABC, "A")
    assert set(dist) == set(ABC.alphabet) and sum(dist.values()) == pytest.approx(1.0)
    assert dist["\n"] == 0.0
    assert next_char_distribution(ABC, "\n\n")["\n"] == 0.0
    assert next_char_distribution(ABC, "CAAAC")["B"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"context.*'D'.*valid characters"):
        next_char_distribution(ABC, "AD")
    with pytest.raises(ValueError, match="cannot occur"):
        next_char_distribution(ABC, "\n\n\n")


def test_window_losses_match_next_char_distribution():
    window = abc_text(6, seed=4)[3:20]
    losses = optimal_window_losses(ABC, window)
    assert losses.shape == (len(window) - 1,)
    for t in range(1, len(window)):
        p = next_char_distribution(ABC, window[:t])[window[t]]
        assert losses[t - 1] == pytest.approx(-math.log(p), abs=1e-12)
    assert optimal_window_losses(ABC, "A").shape == (0,)
    with pytest.raises(ValueError, match="cannot occur"):
        optimal_window_losses(ABC, "AB\n\n\n")


def test_loss_on_text_windows_and_their_mean(long_abc):
    text = long_abc[:600_000]
    n = 16
    losses = optimal_loss_on_text(ABC, text, n)
    assert losses.shape == (len(range(0, len(text) - n, n)), n)
    np.testing.assert_allclose(losses[5], optimal_window_losses(ABC, text[80:97]), atol=1e-12)
    # Column means estimate the per-position optimum. The windows start at word-aligned text,
    # but that is washed out because the text is long and the stride is not a multiple of the words.
    np.testing.assert_allclose(losses.mean(axis=0), optimal_loss_per_position(ABC, n), atol=0.02)
    sliding = optimal_loss_on_text(ABC, text[:1000], 8, stride=1)
    assert sliding.shape == (992, 8)
    np.testing.assert_allclose(sliding[3], optimal_window_losses(ABC, text[3:12]), atol=1e-12)
    assert optimal_loss_on_text(ABC, "AAB", 8).shape == (0, 8)
    with pytest.raises(ValueError, match="stride"):
        optimal_loss_on_text(ABC, text[:100], 8, stride=0)
    with pytest.raises(ValueError, match="window"):
        optimal_loss_on_text(ABC, "AABCBBC\n\n\nAAB", 4, stride=1)
