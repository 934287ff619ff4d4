"""Tiny models and the small data sets they learn in a few steps, shared by the tests (plain names, imported
by name: `from tiny import TINY`; the fixtures built from them are in conftest.py)."""

from __future__ import annotations

import csv
import json

from build_llm import BPETokenizer, GPTConfig
from build_llm.data.instruct import ALPACA_PREAMBLE

# One block of width 16 over 16 positions, no dropout: the smallest model that runs every part, for the
# tests whose assertions do not depend on its sizes. The vocabulary is GPT-2's, for checkpoints saved with
# its tokenizer; `TINY.replace(vocab_size=tok.vocab_size)` for another tokenizer.
TINY = GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)

WORDS = ("red green blue apple pear plum one two three cat dog fox the a is what colour fruit number animal "
         "answer question").split()


def tiny_cfg(vocab: int, **kw) -> GPTConfig:
    """The fine-tuning tests' base model: big enough to learn the data sets below in a few steps."""
    return GPTConfig.from_preset("book-124m", vocab_size=vocab, context_length=96, emb_dim=32, n_heads=4,
                                 n_layers=2, drop_rate=0.0, **kw)


def words_tokenizer() -> BPETokenizer:
    """A 300-token BPE trained on WORDS and the Alpaca prompt's pieces: short ids for the data sets below."""
    text = (" ".join(WORDS) + "\n" + ALPACA_PREAMBLE + "\n\n### Instruction:\n\n\n### Input:\n\n\n### Response:\n")
    return BPETokenizer.train_from_texts([text * 20], vocab_size=300)


def write_classification_csv(path, n_per_class=24):
    """Texts whose class is the word they contain: learnable in a few steps by a tiny model."""
    rows = []
    for i in range(n_per_class):
        for label, word in (("colour", "red green blue"), ("fruit", "apple pear plum"), ("animal", "cat dog fox")):
            w = word.split()[i % 3]
            rows.append({"text": f"the {w} is {'a ' * (i % 4)}{w}", "label": label})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)


def write_instruct_json(path, n=40):
    """Alpaca records asking for the kind of a word (colour, fruit, animal)."""
    items = ["red", "green", "blue", "apple", "pear", "plum", "cat", "dog", "fox"]
    kinds = {"red": "colour", "green": "colour", "blue": "colour", "apple": "fruit", "pear": "fruit",
             "plum": "fruit", "cat": "animal", "dog": "animal", "fox": "animal"}
    records = [{"instruction": "what is the word", "input": items[i % 9], "output": kinds[items[i % 9]]}
               for i in range(n)]
    path.write_text(json.dumps(records))
