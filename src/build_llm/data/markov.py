"""Synthetic text sources and their exact Bayes-optimal loss.

The R seed notebook trains a character GPT on the "ABC" text: the words ``AABCBBC``, ``BCABCCA``
and ``CAAACB\\n\\n`` drawn independently with probabilities 0.4, 0.4 and 0.2 and concatenated.
Because the process is known, the best loss any model can reach is known too, and this module
computes it exactly, so that a training curve can be read against the optimum.

The character stream is a hidden Markov chain. Its hidden state is ``(word, offset)``: the word
being spelled and the position inside it. The state moves to the next offset, or, at the end of a
word, to offset 0 of a freshly drawn word. Each state emits one character deterministically.
The stationary distribution gives every offset of word ``w`` probability ``p(w) / E[L]``, where
``E[L]`` is the mean word length.

A GPT trained on random windows of the text sees, at window position ``t``, the ``t`` characters of
the window so far. The window starts anywhere in the stream, so the model does not know where word
boundaries are. The Bayes-optimal prediction is ``P(X_{t+1} | X_1..X_t)`` under the stationary
process, and its expected loss is the conditional entropy ``H(X_{t+1} | X_1..X_t)`` in nats.
:func:`optimal_loss_per_position` computes these values exactly with a forward (belief) recursion.
It runs over every observed prefix of positive probability, and prefixes with the same belief
about the hidden state are merged.

The character tokenizer also has a ``<PAD>`` token (id 0). It never occurs, so it has probability
0 and changes none of these numbers.

Public names: :class:`WordSource`, :data:`ABC`, :func:`abc_text`, :func:`optimal_loss_per_position`,
:func:`optimal_loss`, :func:`entropy_rate`, :func:`next_char_distribution`,
:func:`optimal_window_losses`, :func:`optimal_loss_on_text`, :func:`is_abc_tokenizer`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from build_llm.data.tokenizer import CharTokenizer
from build_llm.errors import UsageError

__all__ = [
    "WordSource",
    "ABC",
    "abc_text",
    "optimal_loss_per_position",
    "optimal_loss",
    "entropy_rate",
    "next_char_distribution",
    "optimal_window_losses",
    "optimal_loss_on_text",
    "is_abc_tokenizer",
]

# Beliefs equal to this many decimals count as the same belief and are merged. This bounds the
# error of a merge far below anything a trained model can resolve.
_MERGE_DECIMALS = 12
# Stop instead of exhausting memory when a source's prefixes never collapse to few beliefs.
_MAX_BELIEFS = 2_000_000


@dataclass(frozen=True)
class WordSource:
    """Independent draws of whole words, concatenated into one character stream.

    ``words[i]`` is drawn with probability ``probs[i]``, independently each time. Words may repeat
    and need not form a prefix code. The fields are stored as tuples, so a source is hashable.
    """

    words: tuple[str, ...]
    probs: tuple[float, ...]

    def __post_init__(self) -> None:
        words, probs = self.words, self.probs
        if isinstance(words, str) or not isinstance(words, Sequence):
            raise TypeError(f"words: expected a sequence of strings, got {words!r}")
        words = tuple(words)
        if not words:
            raise UsageError("words: got an empty sequence; give at least one non-empty word")
        for i, w in enumerate(words):
            if not isinstance(w, str) or not w:
                raise UsageError(f"words[{i}]: got {w!r}; every word must be a non-empty string")
        if isinstance(probs, (str, bytes)) or not isinstance(probs, (Sequence, np.ndarray)):
            raise TypeError(f"probs: expected a sequence of numbers, got {probs!r}")
        if len(probs) != len(words):
            raise UsageError(
                f"probs: got {len(probs)} probabilities for {len(words)} words; "
                "give one probability per word"
            )
        clean = []
        for i, p in enumerate(probs):
            if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
                raise TypeError(f"probs[{i}]: got {p!r}; every probability must be a number")
            if not math.isfinite(p) or p <= 0:
                raise UsageError(f"probs[{i}]: got {p!r}; every probability must be > 0")
            clean.append(float(p))
        total = math.fsum(clean)
        if abs(total - 1.0) > 1e-9:
            raise UsageError(f"probs: got {tuple(clean)!r} summing to {total!r}; they must sum to 1 (within 1e-9)")
        object.__setattr__(self, "words", words)
        object.__setattr__(self, "probs", tuple(clean))

    @property
    def alphabet(self) -> tuple[str, ...]:
        """The sorted distinct characters of the words. This is the character tokenizer's vocabulary without <PAD>."""
        return tuple(sorted(set("".join(self.words))))

    @property
    def mean_word_length(self) -> float:
        """E[L], the expected number of characters per word."""
        return math.fsum(p * len(w) for w, p in zip(self.words, self.probs))

    def sample(self, n_words: int, seed: int | None = None) -> str:
        """Draw ``n_words`` words i.i.d. and return their concatenation.

        Uses ``numpy.random.default_rng(seed)``. The words follow the same law as R's
        ``sample(1:3, 1, prob=p)``, but the text is not the same: R's random number generator
        cannot be reproduced here.
        """
        if isinstance(n_words, bool) or not isinstance(n_words, (int, np.integer)) or n_words < 0:
            raise UsageError(f"n_words: got {n_words!r}; expected an integer >= 0")
        rng = np.random.default_rng(seed)
        idx = rng.choice(len(self.words), size=int(n_words), p=np.asarray(self.probs))
        return "".join([self.words[i] for i in idx])


#: The R notebook's source: ``voc <- c("AABCBBC", "BCABCCA", "CAAACB\n\n")`` with ``p = (0.4, 0.4, 0.2)``.
ABC = WordSource(words=("AABCBBC", "BCABCCA", "CAAACB\n\n"), probs=(0.4, 0.4, 0.2))
#: The held-out ABC draw that `build-llm eval` and `bench` score (training draws with seed 1).
ABC_EVAL_WORDS, ABC_EVAL_SEED = 30_000, 2027


def abc_text(n_words: int = 150_000, seed: int | None = 1) -> str:
    """The R notebook's ABC training text: ``n_words`` i.i.d. words of :data:`ABC`, concatenated.

    The notebook uses ``set.seed(1)`` and ``M = 150000``, and these are the defaults. R's RNG cannot
    be reproduced, so the text is a different draw from the same distribution. R's ``write()`` also
    adds one trailing newline to its file, and this function leaves it out.
    """
    return ABC.sample(n_words, seed)


# ---------------------------------------------------------------------------------------------
# The hidden Markov chain behind a word source
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Chain:
    alphabet: tuple[str, ...]
    char_index: dict
    transition: np.ndarray  # (S, S): P(next state | state)
    emission: np.ndarray  # (S, V): one-hot, the character each state spells
    stationary: np.ndarray  # (S,)


@functools.lru_cache(maxsize=32)
def _chain(source: WordSource) -> _Chain:
    alphabet = source.alphabet
    char_index = {c: i for i, c in enumerate(alphabet)}
    starts, n = [], 0
    for w in source.words:
        starts.append(n)
        n += len(w)
    transition = np.zeros((n, n))
    emission = np.zeros((n, len(alphabet)))
    stationary = np.zeros(n)
    first_states = np.array(starts)
    probs = np.array(source.probs)
    for w, p, s0 in zip(source.words, source.probs, starts):
        for k, ch in enumerate(w):
            s = s0 + k
            emission[s, char_index[ch]] = 1.0
            stationary[s] = p
            if k + 1 < len(w):
                transition[s, s + 1] = 1.0
            else:
                # Repeated words share target states only by index, so accumulate.
                np.add.at(transition[s], first_states, probs)
    stationary /= stationary.sum()
    return _Chain(alphabet, char_index, transition, emission, stationary)


def _merge(beliefs: np.ndarray) -> np.ndarray:
    """Merge rows (unnormalised beliefs) that point the same way, adding their masses.

    Future losses depend only on the normalised belief, and each row's contribution scales with
    its mass. Merging rows that point the same way therefore changes no loss.
    """
    mass = beliefs.sum(axis=1)
    keys = np.round(beliefs / mass[:, None], _MERGE_DECIMALS)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    merged = np.zeros((len(first), beliefs.shape[1]))
    np.add.at(merged, inverse, beliefs)
    return merged


def _split(chain: _Chain, predicted: np.ndarray) -> np.ndarray:
    """Condition each predicted state distribution on each possible observed character."""
    n, s = predicted.shape
    v = chain.emission.shape[1]
    rows = (predicted[:, None, :] * chain.emission.T[None, :, :]).reshape(n * v, s)
    rows = rows[rows.sum(axis=1) > 0]
    if len(rows) > _MAX_BELIEFS:
        raise RuntimeError(
            f"the belief recursion reached {len(rows)} distinct beliefs (limit {_MAX_BELIEFS}); "
            "this source's prefixes do not collapse, so use a shorter context_length"
        )
    return _merge(rows)


def _conditional_entropies(chain: _Chain, initial: np.ndarray) -> Iterator[float]:
    """Yield ``H(X_{t+1} | X_1..X_t [, initial condition])`` for t = 1, 2, ...

    ``initial`` is an (N, S) matrix. Each row is the joint mass of one initial condition with the
    state that emits X_1. One row equal to the stationary distribution gives the quantity a model
    sees. ``diag(stationary)`` conditions on the first hidden state as well.
    """
    beliefs = _split(chain, initial)  # after observing X_1
    while True:
        predicted = beliefs @ chain.transition  # (N, S): state of X_{t+1}, joint with the prefix
        joint = predicted @ chain.emission  # (N, V): P(prefix, X_{t+1} = c)
        mass = joint.sum(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(joint > 0, -joint * np.log(joint / mass), 0.0)
        yield float(terms.sum())
        beliefs = _split(chain, predicted)


def _check_context_length(context_length: int) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)) or context_length < 1:
        raise UsageError(f"context_length: got {context_length!r}; expected an integer >= 1")
    return int(context_length)


def _check_source(source: WordSource) -> WordSource:
    if not isinstance(source, WordSource):
        raise TypeError(f"source: expected a WordSource, got {type(source).__name__}")
    return source


def optimal_loss_per_position(source: WordSource, context_length: int) -> np.ndarray:
    """Exact Bayes-optimal loss at each window position, in nats.

    Entry ``t - 1`` is ``H(X_{t+1} | X_1..X_t)`` for the stationary character stream, for
    t = 1..``context_length``. This is the lowest expected cross-entropy a model can reach at window
    position t when it sees the t characters of a window that starts at a random point of the
    text. The values are non-increasing in t and tend to :func:`entropy_rate`. They are computed
    exactly by the belief recursion, with no sampling.
    """
    _check_source(source)
    n = _check_context_length(context_length)
    chain = _chain(source)
    gen = _conditional_entropies(chain, chain.stationary[None, :])
    return np.array([next(gen) for _ in range(n)])


def optimal_loss(source: WordSource, context_length: int) -> float:
    """Exact Bayes-optimal training loss for windows of ``context_length`` tokens, in nats.

    This is the mean of :func:`optimal_loss_per_position` over the window's positions. It is the
    value that a GPT's loss, averaged over all positions of random windows, converges to when
    the model is perfect.
    """
    return float(optimal_loss_per_position(source, context_length).mean())


def _is_uniquely_decodable(words: Sequence[str]) -> bool:
    """The Sardinas-Patterson test: does every finite string have at most one parse into words?"""
    code = set(words)
    if len(code) < len(words):
        return False

    def dangling(prefixes, strings):
        return {b[len(a):] for a in prefixes for b in strings if len(b) > len(a) and b.startswith(a)}

    suffixes = dangling(code, code)
    seen = set()
    while suffixes:
        if suffixes & code:
            return False
        key = frozenset(suffixes)
        if key in seen:
            return True
        seen.add(key)
        suffixes = dangling(code, suffixes) | dangling(suffixes, code)
    return True


def entropy_rate(source: WordSource, *, tol: float = 1e-10, max_steps: int = 100_000) -> float:
    """Exact entropy rate ``lim_t H(X_{t+1} | X_1..X_t)`` of the character stream, in nats per character.

    If the words are uniquely decodable (checked with the Sardinas-Patterson test), a long text
    determines its words, and the rate is ``H(word) / E[word length]``. Otherwise, for example with
    repeated words or ``("A", "AA")``, the word choice is partly invisible in the text. The rate is
    then the common limit of two bounds that the belief recursion computes:
    ``H(X_{t+1} | X_1..X_t, S_1) <= rate <= H(X_{t+1} | X_1..X_t)``, where S_1 is the first hidden
    state (Cover & Thomas, Thm 4.5.1). The recursion stops when the bounds are within ``tol``, and
    raises ``RuntimeError`` if that takes more than ``max_steps``.
    """
    _check_source(source)
    if _is_uniquely_decodable(source.words):
        h_word = -math.fsum(p * math.log(p) for p in source.probs)
        return h_word / source.mean_word_length
    chain = _chain(source)
    upper = _conditional_entropies(chain, chain.stationary[None, :])
    lower = _conditional_entropies(chain, np.diag(chain.stationary))
    hi = lo = float("nan")
    for _ in range(max_steps):
        hi, lo = next(upper), next(lower)
        if hi - lo <= tol:
            return 0.5 * (hi + lo)
    raise RuntimeError(
        f"entropy_rate: the bounds [{lo!r}, {hi!r}] are not within tol={tol!r} after max_steps={max_steps}; "
        "raise max_steps or tol"
    )


# ---------------------------------------------------------------------------------------------
# True next-character probabilities for concrete text
# ---------------------------------------------------------------------------------------------


def _encode(chain: _Chain, text: str, argname: str) -> np.ndarray:
    try:
        return np.array([chain.char_index[c] for c in text], dtype=np.int64)
    except KeyError as exc:
        raise UsageError(
            f"{argname}: character {exc.args[0]!r} is not produced by the source; "
            f"valid characters are {chain.alphabet!r}"
        ) from None


def next_char_distribution(source: WordSource, context: str) -> dict[str, float]:
    """Exact ``P(next character | context)`` under the stationary stream.

    The context is the text the model sees: a window that starts at an unknown point of the
    stream, so word boundaries are not known. Pass the last ``context_length`` characters to get
    what a model with that context should predict. An empty context gives the stationary character
    frequencies. The keys are every character of ``source.alphabet``, including those with
    probability 0. Raises ``ValueError`` if the context cannot occur.
    """
    _check_source(source)
    if not isinstance(context, str):
        raise TypeError(f"context: expected a str, got {type(context).__name__}")
    chain = _chain(source)
    ids = _encode(chain, context, "context")
    belief = chain.stationary.copy()  # distribution of the state emitting the next character
    for i, c in enumerate(ids):
        belief = belief * chain.emission[:, c]
        total = belief.sum()
        if total <= 0:
            raise UsageError(
                f"context: {context!r} cannot occur in this source "
                f"(character {context[i]!r} at index {i} has probability 0 after {context[:i]!r})"
            )
        belief = (belief / total) @ chain.transition
    probs = belief @ chain.emission
    probs = probs / probs.sum()
    return {c: float(p) for c, p in zip(chain.alphabet, probs)}


def _batched_window_losses(chain: _Chain, ids: np.ndarray, texts_for_errors) -> np.ndarray:
    """``ids`` (N, T+1) -> (N, T) of ``-log P(x_{t+1} | x_1..x_t)``, each row its own window."""
    n, length = ids.shape
    losses = np.empty((n, max(length - 1, 0)))
    if length == 0:
        return losses
    belief = np.broadcast_to(chain.stationary, (n, len(chain.stationary)))
    emission_t = chain.emission.T  # (V, S)
    for t in range(length):
        if t > 0:
            predicted = belief @ chain.transition
            p_next = (predicted * emission_t[ids[:, t]]).sum(axis=1)
            bad = np.flatnonzero(p_next <= 0)
            if bad.size:
                w = int(bad[0])
                raise UsageError(
                    f"text: window {w} ({texts_for_errors(w)!r}) cannot occur in this source: its "
                    f"character at window position {t} has probability 0 after what precedes it"
                )
            losses[:, t - 1] = -np.log(p_next)
            belief = predicted
        belief = belief * emission_t[ids[:, t]]
        total = belief.sum(axis=1, keepdims=True)
        if t == 0 and np.any(total <= 0):  # cannot happen after _encode; kept as an invariant
            raise AssertionError("first character with zero stationary probability")
        belief = belief / total
    return losses


def optimal_window_losses(source: WordSource, window: str) -> np.ndarray:
    """Bayes-optimal per-token losses ``-log P(x_{t+1} | x_1..x_t)`` for one window ``x_1..x_{T+1}``.

    The result has length ``len(window) - 1``. Entry ``t - 1`` is the true loss on the target of
    input position t, with the context being the window's own first t characters. This is how a GPT
    sees a window given as input ``window[:-1]`` with targets ``window[1:]``. Subtract it from the
    model's per-token losses on the same window to get the excess loss at each position.
    """
    _check_source(source)
    if not isinstance(window, str):
        raise TypeError(f"window: expected a str, got {type(window).__name__}")
    chain = _chain(source)
    ids = _encode(chain, window, "window")[None, :]
    return _batched_window_losses(chain, ids, lambda _: window)[0]


def optimal_loss_on_text(
    source: WordSource, text: str, context_length: int, stride: int | None = None
) -> np.ndarray:
    """Bayes-optimal per-token losses on the windows that a sliding-window loader cuts from ``text``.

    The windows are those of the book's ``GPTDatasetV1``. For ``i`` in
    ``range(0, len(text) - context_length, stride)``, the input is ``text[i:i + context_length]`` and
    the targets are ``text[i + 1:i + context_length + 1]``. ``stride`` defaults to ``context_length``,
    which gives non-overlapping windows. Returns an array of shape ``(n_windows, context_length)``
    in nats. Its mean is the optimum for the model's loss on the same windows, and its column means
    estimate :func:`optimal_loss_per_position`.
    """
    _check_source(source)
    if not isinstance(text, str):
        raise TypeError(f"text: expected a str, got {type(text).__name__}")
    n = _check_context_length(context_length)
    if stride is None:
        stride = n
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise UsageError(f"stride: got {stride!r}; expected an integer >= 1")
    chain = _chain(source)
    all_ids = _encode(chain, text, "text")
    starts = np.arange(0, len(text) - n, int(stride))
    if starts.size == 0:
        return np.empty((0, n))
    ids = all_ids[starts[:, None] + np.arange(n + 1)[None, :]]
    return _batched_window_losses(chain, ids, lambda w: text[starts[w] : starts[w] + n + 1])


def is_abc_tokenizer(tokenizer: object) -> bool:
    """True for a character tokenizer over exactly :data:`ABC`'s alphabet (plus ``<PAD>``): a model
    that reads ABC text, whose true next-character distribution is known."""
    return isinstance(tokenizer, CharTokenizer) and tokenizer.vocab[1:] == list(ABC.alphabet)
