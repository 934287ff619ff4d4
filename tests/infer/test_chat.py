"""Tests for build_llm.infer.chat's prompt fitting (the chat session and `build-llm chat` run end to end
in tests/train/test_cli_finetune.py)."""

from __future__ import annotations

import pytest

from build_llm.data.chat_template import AlpacaChat
from build_llm.data.instruct import encode_conversation
from build_llm.infer.chat import fit_conversation, fit_reply, reply_room


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


def test_fit_reply_gives_the_reply_what_the_context_leaves(tokenizer):
    eos = tokenizer.eos_id
    message = [{"role": "user", "content": "what colour " * 3}]
    alone, _ = encode_conversation(message, tokenizer, eos, add_generation_prompt=True)
    context = len(alone) + 5
    # Default: the reply may take every position the prompt leaves, even fewer than reply_room's.
    ids, dropped, length = fit_reply(message, AlpacaChat(tokenizer), context, None)
    assert ids == alone and dropped == 0 and length == 5 and reply_room(context) > 5
    # Explicit: that length or a clear error, as before.
    assert fit_reply(message, AlpacaChat(tokenizer), context, 5)[2] == 5
    with pytest.raises(ValueError, match="send a shorter message"):
        fit_reply(message, AlpacaChat(tokenizer), context, 6)
    with pytest.raises(ValueError, match=f"more than the {len(alone) - 1} the context window leaves"):
        fit_reply(message, AlpacaChat(tokenizer), len(alone), None)  # no room for even one token
    # Old turns are dropped to keep reply_room for the reply when they can be.
    turns = [{"role": "user", "content": "red"}, {"role": "assistant", "content": "blue " * 20}, *message]
    whole, _ = encode_conversation(turns, tokenizer, eos, add_generation_prompt=True)
    context = 4 * len(whole) // 3  # reply_room is half of it: the whole conversation does not leave it
    ids, dropped, length = fit_reply(turns, AlpacaChat(tokenizer), context, None)
    assert dropped == 1 and ids == alone and length == context - len(alone) >= reply_room(context)
    system = [{"role": "system", "content": "Be brief."}]
    ids, dropped, length = fit_reply(system + turns, AlpacaChat(tokenizer), len(alone) + 8, None)  # the fallback
    assert dropped == 1 and ids == encode_conversation(system + message, tokenizer, eos, add_generation_prompt=True)[0]
    assert length == len(alone) + 8 - len(ids) >= 1
