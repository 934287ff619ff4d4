"""Fixtures of the training tests."""

import pytest
import torch

from build_llm import GPTModel
from build_llm.store.checkpoint import save_checkpoint
from tiny import tiny_cfg


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """A tiny random base checkpoint with the fine-tuning BPE tokenizer (the fine-tunes' --init-from)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "ckpt"
    save_checkpoint(path, GPTModel(tiny_cfg(tokenizer.vocab_size)), tokenizer)
    return path
