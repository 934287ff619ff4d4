"""Tests for build_llm.infer.chat's prompt fitting (the chat session and `build-llm chat` run end to end
in tests/train/test_cli_finetune.py)."""

from __future__ import annotations

import pytest

from build_llm.data.chat_template import AlpacaChat
from build_llm.data.instruct import encode_conversation
from build_llm.infer.chat import fit_conversation


def test_fit_conversation_drops_the_oldest_turns(tokenizer):
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": "what colour " * 3}, {"role": "assistant", "content": "red " * 3}]
    turns.append({"role": "user", "content": "cat"})
    full, _ = encode_conversation(turns, tokenizer, tokenizer.eos_id, add_generation_prompt=True)
    ids, dropped = fit_conversation(turns, AlpacaChat(tokenizer), len(full) - 1)
    assert dropped == 1 and len(ids) < len(full)
    ids, dropped = fit_conversation(turns, AlpacaChat(tokenizer), len(full))
    assert dropped == 0 and ids == full
    with pytest.raises(ValueError, match="send a shorter message"):
        fit_conversation(turns, AlpacaChat(tokenizer), 5)
