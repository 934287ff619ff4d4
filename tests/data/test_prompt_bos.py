"""A plain-text prompt is encoded as transformers' `tokenizer(text)` encodes it: with the tokens the
tokenizer.json's post-processor puts before the text (Llama 3's <|begin_of_text|>, Gemma's <bos>), which
these models are trained to see first; the chat template's text is encoded without them (it writes them)."""

from __future__ import annotations

import pytest

from build_llm.cli.model import start_ids
from build_llm.data.tokenizer import get_tokenizer, load_tokenizer
from build_llm.infer.generate import text_to_token_ids
from tiny import write_chat_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

BOS = "<|begin_of_text|>"


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory):
    """(transformers' tokenizer, ours) of a directory whose tokenizer.json prepends bos, as Llama 3's does."""
    path = tmp_path_factory.mktemp("bos")
    hf = write_chat_tokenizer(path, "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
                              bos_token=BOS, eos_token="<|eot_id|>")
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, hf.convert_tokens_to_ids(BOS))])
    tok.save(str(path / "tokenizer.json"))
    return transformers.AutoTokenizer.from_pretrained(path), load_tokenizer(path / "tokenizer.json")


def test_a_prompt_gets_the_bos_transformers_puts_before_it(bos_tokenizer):
    hf, ours = bos_tokenizer
    text = "Hello there, how are you?"
    expected = hf(text)["input_ids"]
    assert expected[0] == hf.bos_token_id and expected[1:] == ours.encode(text)
    assert ours.encode_prompt(text) == expected
    assert text_to_token_ids(text, ours)[0].tolist() == expected


def test_generate_starts_after_bos_and_prints_only_the_prompt(bos_tokenizer):
    hf, ours = bos_tokenizer
    ids, shown = start_ids(ours, "Hello there")
    assert ids == hf("Hello there")["input_ids"] and ours.decode(shown) == "Hello there"
    ids, shown = start_ids(ours, None)  # a new text starts at bos, as transformers' generate does
    assert ids == [hf.bos_token_id] and list(shown) == []


def test_tokenizers_without_a_start_token_are_unchanged():
    gpt2 = get_tokenizer("gpt2")
    assert gpt2.encode_prompt("Hello world") == gpt2.encode("Hello world")
    ids, shown = start_ids(gpt2, "Hello world")
    assert ids == list(shown) == gpt2.encode("Hello world")
    assert start_ids(gpt2, None) == ([gpt2.eos_id], [])


def test_serve_completions_encode_the_prompt_with_bos(bos_tokenizer):
    """/v1/completions as vLLM serves a Llama 3: the prompt as tokenizer(text) encodes it."""
    import threading
    import time

    import openai
    import torch
    import uvicorn

    from build_llm import GPTConfig, GPTModel
    from build_llm.infer.generate import generate
    from build_llm.serve import Settings, create_app
    from build_llm.serve.engine import Engine

    hf, ours = bos_tokenizer
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=ours.vocab_size, context_length=64, emb_dim=32, n_heads=2, n_layers=1,
                               drop_rate=0.0)).eval()
    server = uvicorn.Server(uvicorn.Config(create_app(Engine(model, max_batch=1, max_queue=2), ours, Settings("b")),
                                           host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        r = client.completions.create(model="b", prompt="Hello there", max_tokens=4, temperature=0)
        ids = hf("Hello there")["input_ids"]
        assert r.usage.prompt_tokens == len(ids)
        assert r.choices[0].text == ours.decode(generate(model, torch.tensor([ids]), 4)[0, len(ids):].tolist())
    finally:
        server.should_exit = True
        thread.join(30)
