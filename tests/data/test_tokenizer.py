"""Tests for build_llm.data.tokenizer: GPT-2 offline, the R notebook's characters, trained byte-level BPE."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from build_llm.data.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    get_tokenizer,
    gpt2_data_dir,
    gpt2_encoding_kwargs,
    load_tokenizer,
    tokenizer_from_json,
    tokenizer_stats,
)

# Golden values printed by the seed notebook (000_...txt) with tiktoken's downloaded GPT-2.
SEED_TEXTS = {
    "O gato dorme no": [46, 308, 5549, 18586, 68, 645],
    "O gato sobe no": [46, 308, 5549, 523, 1350, 645],
}
SEED_DECODE = ([34381, 37516, 12434, 42030, 37383, 678], " Dice eighty Driverfoundland Garner 19")

# Hypothesis' default text strategy already excludes lone surrogates, which no str -> UTF-8 codec takes.
any_text = st.text(max_size=200)


# --------------------------------------------------------------------------------------------------
# GPT-2
# --------------------------------------------------------------------------------------------------

OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, socket, sys

    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    socket.socket.connect = no_network
    socket.create_connection = no_network
    socket.getaddrinfo = no_network

    import build_llm, tiktoken, tiktoken.registry

    built_at_import = "gpt2" in tiktoken.registry.ENCODINGS
    enc = tiktoken.get_encoding("gpt2")
    texts = json.loads(sys.argv[1])
    ids = json.loads(sys.argv[2])
    print(json.dumps({
        "built_at_import": built_at_import,
        "encoded": {t: enc.encode(t) for t in texts},
        "decoded": enc.decode(ids),
        "n_vocab": enc.n_vocab,
        "eot": enc.eot_token,
    }))
    """
)


def test_tiktoken_gpt2_works_offline_after_import(tmp_path):
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(cache))
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env[var] = "http://127.0.0.1:9"  # the discard port: any download attempt fails at once
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    out = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, json.dumps(list(SEED_TEXTS)), json.dumps(SEED_DECODE[0])],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["encoded"] == SEED_TEXTS
    assert result["decoded"] == SEED_DECODE[1]
    assert (result["n_vocab"], result["eot"]) == (50257, 50256)
    assert result["built_at_import"] is False  # importing build_llm stays cheap
    assert list(cache.iterdir()) == []  # nothing fetched, nothing cached


@pytest.fixture(scope="module")
def gpt2():
    return GPT2Tokenizer()


def test_gpt2_seed_values(gpt2):
    for text, ids in SEED_TEXTS.items():
        assert gpt2.encode(text) == ids
        assert gpt2.decode(ids) == text
    assert gpt2.decode(SEED_DECODE[0]) == SEED_DECODE[1]
    assert (gpt2.vocab_size, gpt2.eos_id) == (50257, 50256)


def test_gpt2_endoftext_is_allowed_special(gpt2):
    assert gpt2.encode("<|endoftext|>") == [50256]
    ids = gpt2.encode("fim<|endoftext|>início")
    assert ids.count(50256) == 1
    assert gpt2.decode(ids) == "fim<|endoftext|>início"
    assert gpt2.decode([50256]) == "<|endoftext|>"


def test_gpt2_ranks_match_tiktokens_own_loader(monkeypatch):
    # Independent reference: tiktoken's loader also reads vocab.bpe's merges and checks them.
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # empty string: tiktoken caches nothing
    d = gpt2_data_dir()
    ranks = data_gym_to_mergeable_bpe_ranks(str(d / "vocab.bpe"), str(d / "encoder.json"))
    assert gpt2_encoding_kwargs()["mergeable_ranks"] == ranks


def test_gpt2_matches_hugging_face_bpe_on_the_same_files(gpt2):
    # Independent reference: Hugging Face's Rust BPE reading the same encoder.json and vocab.bpe.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    d = gpt2_data_dir()
    hf = Tokenizer(models.BPE.from_file(str(d / "encoder.json"), str(d / "vocab.bpe")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    texts = [
        *SEED_TEXTS,
        "Era uma vez um gato que dormia no telhado, às 3h15, com 2.5 kg de ração.",
        "def f(x):\n    return x ** 2  # it's squared, isn't it?\n\n\n",
        "Hello   world \t tabs\r\nand ünïcödé — emoji 🙂 日本語 ok",
        "   leading and trailing spaces   ",
    ]
    for text in texts:
        assert gpt2.encode(text) == hf.encode(text).ids, text


@settings(max_examples=200, deadline=None)
@given(any_text)
def test_gpt2_round_trip(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_decode_rejects_out_of_range(gpt2):
    with pytest.raises(ValueError, match="50257"):
        gpt2.decode([1, 50257])
    with pytest.raises(ValueError, match="-1"):
        gpt2.decode([-1])


def test_gpt2_detects_tampered_files(tmp_path):
    d = gpt2_data_dir()
    shutil.copy(d / "encoder.json", tmp_path / "encoder.json")
    data = bytearray((d / "vocab.bpe").read_bytes())
    data[-2] ^= 1  # one flipped bit in the last merge
    (tmp_path / "vocab.bpe").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="vocab.bpe has SHA-256 .* canonical GPT-2"):
        GPT2Tokenizer(data_dir=tmp_path)
    (tmp_path / "vocab.bpe").unlink()
    with pytest.raises(ValueError, match="no vocab.bpe"):
        GPT2Tokenizer(data_dir=tmp_path)


def test_gpt2_from_an_explicit_data_dir(tmp_path):
    d = gpt2_data_dir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(d / name, tmp_path / name)
    tok = GPT2Tokenizer(data_dir=tmp_path)
    assert tok.encode("O gato dorme no") == SEED_TEXTS["O gato dorme no"]


# --------------------------------------------------------------------------------------------------
# Characters (the R notebook)
# --------------------------------------------------------------------------------------------------

ABC_CORPUS = "AABCBBC" + "BCABCCA" + "CAAACB\n\n" + "AABCBBC"


def test_char_matches_the_r_notebook():
    tok = CharTokenizer.from_text(ABC_CORPUS)
    assert tok.vocab == ["<PAD>", "\n", "A", "B", "C"]
    sample = "ABA C\nC".replace(" ", "")
    r_ids = [3, 4, 3, 5, 2, 5]  # the notebook's 1-based Encoder output
    assert tok.encode(sample) == [i - 1 for i in r_ids]
    assert tok.decode(tok.encode(sample)) == sample
    assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (5, None, 0)


def test_char_pad_decodes_to_nothing():
    tok = CharTokenizer(["<PAD>", "a", "b"])
    assert tok.decode([0, 1, 0, 0, 2, 0]) == "ab"


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_char_round_trip(data):
    corpus = data.draw(st.text(min_size=1, max_size=50), label="corpus")
    tok = CharTokenizer.from_text(corpus)
    assert tok.vocab[1:] == sorted(set(corpus))
    text = data.draw(st.text(alphabet=tok.vocab[1:], max_size=100), label="text")
    ids = tok.encode(text)
    assert all(1 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_char_unknown_characters_are_named():
    tok = CharTokenizer.from_text(ABC_CORPUS)
    with pytest.raises(ValueError, match=r"'x', 'é'.*valid characters are '\\n', 'A', 'B', 'C'"):
        tok.encode("ABxéA")


def test_char_error_abbreviates_a_long_vocabulary():
    tok = CharTokenizer.from_text("".join(chr(c) for c in range(0x4E00, 0x4E00 + 500)))
    with pytest.raises(ValueError, match=r"\.\.\. \(470 more\)") as info:
        tok.encode("?")
    assert len(str(info.value)) < 400


def test_char_decode_rejects_out_of_range():
    tok = CharTokenizer.from_text(ABC_CORPUS)
    with pytest.raises(ValueError, match="5.*0..4"):
        tok.decode([1, 5])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="ids"):
        tok.decode("ABC")


@pytest.mark.parametrize(
    ("vocab", "message"),
    [
        (["A", "B"], "must start with '<PAD>'"),
        ([], "must start with '<PAD>'"),
        (["<PAD>", "A", "AB"], "single characters.*'AB'"),
        (["<PAD>", "A", "B", "A"], "repeated characters: 'A'"),
    ],
)
def test_char_rejects_bad_vocabularies(vocab, message):
    with pytest.raises(ValueError, match=message):
        CharTokenizer(vocab)


def test_char_from_empty_text_is_an_error():
    with pytest.raises(ValueError, match="text is empty"):
        CharTokenizer.from_text("")


# --------------------------------------------------------------------------------------------------
# Trained byte-level BPE
# --------------------------------------------------------------------------------------------------


def _generated_corpus(n_words: int = 1500, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["gato", "dorme", "sobe", "no", "telhado", "ação", "coração"]
    words += ["the", "cat", "über", "日本", "🙂"]
    return "".join(rng.choice(words) + rng.choice([" ", " ", " ", ", ", ".\n"]) for _ in range(n_words))


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "corpus.txt"
    path.write_text(_generated_corpus(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe(bpe_file):
    return BPETokenizer.train(bpe_file, vocab_size=300)


def test_bpe_trains_the_requested_vocabulary(bpe, bpe_file):
    assert bpe.vocab_size == 300
    assert bpe.eos_id == bpe.hf_tokenizer.token_to_id("<|endoftext|>") is not None
    assert bpe.encode("<|endoftext|>") == [bpe.eos_id]
    # It learned something: the corpus takes far fewer tokens than bytes.
    assert tokenizer_stats(bpe_file.read_text(encoding="utf-8"), bpe)["bytes_per_token"] > 2


@settings(max_examples=200, deadline=None)
@given(any_text, st.booleans())
def test_bpe_round_trip(bpe, text, with_eos):
    if with_eos:
        text = text[: len(text) // 2] + "<|endoftext|>" + text[len(text) // 2 :]
    assert bpe.decode(bpe.encode(text)) == text


@pytest.fixture(scope="module")
def raw_hf(bpe, tmp_path_factory):
    from tokenizers import Tokenizer

    path = tmp_path_factory.mktemp("bpe-saved") / "tokenizer.json"
    bpe.save(path)
    return Tokenizer.from_file(str(path))


@settings(max_examples=100, deadline=None)
@given(any_text)
def test_bpe_matches_the_raw_tokenizers_object(bpe, raw_hf, text):
    # Reference: the saved file read back by `tokenizers` itself, with no build_llm code in between.
    ids = raw_hf.encode(text).ids
    assert bpe.encode(text) == ids
    assert bpe.decode(ids) == raw_hf.decode(ids, skip_special_tokens=False)


def test_bpe_train_from_texts():
    tok = BPETokenizer.train_from_texts([_generated_corpus(500, seed=1)], vocab_size=280)
    assert tok.vocab_size == 280
    assert tok.decode(tok.encode("coração 🙂 gato")) == "coração 🙂 gato"


def test_bpe_train_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file.*missing.txt"):
        BPETokenizer.train(tmp_path / "missing.txt", vocab_size=300)
    with pytest.raises(ValueError, match="files is empty"):
        BPETokenizer.train([], vocab_size=300)
    with pytest.raises(ValueError, match=r"vocab_size must be an int in \[257, 1,048,576\].*100"):
        BPETokenizer.train_from_texts(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match=r"vocab_size must be an int in \[257, 1,048,576\].*1099511627776"):
        BPETokenizer.train_from_texts(["abc"], vocab_size=2**40)  # the trainer would abort the process
    with pytest.raises(TypeError, match="tokenizers.Tokenizer"):
        BPETokenizer({"model": {}})


# --------------------------------------------------------------------------------------------------
# Save / load and get_tokenizer
# --------------------------------------------------------------------------------------------------

PROBE = "O gato dorme no telhado.\nAABCBBC"


@pytest.mark.parametrize("kind", ["char", "gpt2", "bpe"])
def test_save_load_round_trip(kind, bpe, tmp_path):
    tok = {"char": CharTokenizer.from_text(PROBE), "gpt2": GPT2Tokenizer(), "bpe": bpe}[kind]
    assert isinstance(tok, Tokenizer)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    json.loads(path.read_text(encoding="utf-8"))  # plain JSON on disk
    from_dir = get_tokenizer(str(tmp_path))  # a checkpoint directory holding tokenizer.json
    for loaded in (load_tokenizer(path), get_tokenizer(path), from_dir, tokenizer_from_json(tok.to_json())):
        assert type(loaded) is type(tok)
        assert (loaded.vocab_size, loaded.eos_id) == (tok.vocab_size, tok.eos_id)
        assert loaded.encode(PROBE) == tok.encode(PROBE)
        assert loaded.decode(tok.encode(PROBE)) == PROBE


def test_bpe_is_saved_as_a_plain_hugging_face_file(bpe, tmp_path):
    path = tmp_path / "ours.json"
    bpe.save(path)
    assert "model" in json.loads(path.read_text(encoding="utf-8"))
    # And a tokenizer.json written by `tokenizers` itself loads through get_tokenizer.
    hf_path = tmp_path / "hf-tokenizer.json"
    bpe.hf_tokenizer.save(str(hf_path))
    loaded = get_tokenizer(hf_path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.encode(PROBE) == bpe.encode(PROBE)


def test_get_tokenizer_by_name():
    assert isinstance(get_tokenizer("gpt2"), GPT2Tokenizer)
    char = get_tokenizer("char", text=ABC_CORPUS)
    assert char.vocab == ["<PAD>", "\n", "A", "B", "C"]


def test_get_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match=r"needs text="):
        get_tokenizer("char")
    with pytest.raises(ValueError, match=r"'nope'.*'gpt2', 'char'.*existing path"):
        get_tokenizer("nope")
    with pytest.raises(ValueError, match=r"missing\.json.*neither a tokenizer name"):
        get_tokenizer(tmp_path / "missing.json")
    with pytest.raises(TypeError, match="name_or_path"):
        get_tokenizer(42)

    not_json = tmp_path / "not.json"
    not_json.write_text("{this is not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"not\.json.*does not parse as JSON"):
        get_tokenizer(not_json)

    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"type": "wordpiece"}), encoding="utf-8")
    expected = r"unknown\.json.*unknown tokenizer type 'wordpiece'.*'char', 'gpt2'"
    with pytest.raises(ValueError, match=expected):
        get_tokenizer(unknown)

    a_list = tmp_path / "list.json"
    a_list.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TypeError, match=r"list\.json.*must be an object"):
        load_tokenizer(a_list)

    neither = tmp_path / "neither.json"
    neither.write_text(json.dumps({"vocab": ["<PAD>"]}), encoding="utf-8")
    with pytest.raises(ValueError, match="neither 'type'.*'vocab'"):
        load_tokenizer(neither)

    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def test_tokenizer_stats():
    text = "ação"  # 4 characters, 6 UTF-8 bytes
    stats = tokenizer_stats(text, CharTokenizer.from_text(text))
    assert stats == {"tokens": 4, "characters": 4, "bytes": 6, "tokens_per_char": 1.0, "bytes_per_token": 1.5}
    gpt2_stats = tokenizer_stats("O gato dorme no", GPT2Tokenizer())
    assert gpt2_stats["tokens"] == 6
    assert gpt2_stats["bytes_per_token"] == pytest.approx(15 / 6)
    with pytest.raises(ValueError, match="text is empty"):
        tokenizer_stats("", GPT2Tokenizer())


def test_text_size_counts_characters_and_bytes_without_decoding():
    """text_size from the ids alone equals the decoded text's length in characters and in UTF-8 bytes,
    for ids that cut characters in parts (byte-level BPE) and for a slice starting at any whole token."""
    from build_llm.data.tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer, text_size

    text = "héllo wörld 日本語 🙂 <|endoftext|> naïve\n\t  x ÿ\u00ad\u0100" * 30
    for tok in (GPT2Tokenizer(), CharTokenizer.from_text(text), BPETokenizer.train_from_texts([text], 300)):
        ids = tok.encode(text)
        assert text_size(ids, tok) == (len(text), len(text.encode("utf-8"))), tok
        tail = ids[len(ids) // 2:]
        decoded = tok.decode(tail)
        if "\ufffd" not in decoded:  # a slice that starts at a character
            assert text_size(tail, tok, chunk=7) == (len(decoded), len(decoded.encode("utf-8")))


def test_save_replaces_a_symbolic_link_at_the_name_and_leaves_its_target_alone(tmp_path):
    victim = tmp_path / "notes.txt"
    victim.write_text("a user's file")
    link = tmp_path / "tokenizer.json"
    link.symlink_to(victim)  # planted, or left by the user: writing through it would destroy notes.txt
    tok = CharTokenizer.from_text("hello")
    tok.save(link)
    assert victim.read_text() == "a user's file"
    assert not link.is_symlink() and load_tokenizer(link).encode("hello") == tok.encode("hello")
