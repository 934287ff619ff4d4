"""Shared pieces of the fine-tuning tests: a tiny BPE tokenizer and base checkpoint, and two small
data sets a tiny model learns in a few steps."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from build_llm import BPETokenizer, GPTConfig, GPTModel
from build_llm.store.checkpoint import save_checkpoint
from build_llm.data.instruct import ALPACA_PREAMBLE

WORDS = ("red green blue apple pear plum one two three cat dog fox the a is what colour fruit number animal "
         "answer question").split()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, most of all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    text = (" ".join(WORDS) + "\n" + ALPACA_PREAMBLE + "\n\n### Instruction:\n\n\n### Input:\n\n\n### Response:\n")
    return BPETokenizer.train_from_texts([text * 20], vocab_size=300)


def tiny_cfg(vocab: int, **kw) -> GPTConfig:
    return GPTConfig.from_preset("book-124m", vocab_size=vocab, context_length=96, emb_dim=32, n_heads=4,
                                 n_layers=2, drop_rate=0.0, **kw)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """A tiny random base checkpoint with a BPE tokenizer (the fine-tunes' --init-from)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "ckpt"
    save_checkpoint(path, GPTModel(tiny_cfg(tokenizer.vocab_size)), tokenizer)
    return path


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
    items = ["red", "green", "blue", "apple", "pear", "plum", "cat", "dog", "fox"]
    kinds = {"red": "colour", "green": "colour", "blue": "colour", "apple": "fruit", "pear": "fruit",
             "plum": "fruit", "cat": "animal", "dog": "animal", "fox": "animal"}
    records = [{"instruction": "what is the word", "input": items[i % 9], "output": kinds[items[i % 9]]}
               for i in range(n)]
    path.write_text(json.dumps(records))
