"""A Hugging Face chat model end to end: a tiny random GPT-2 saved by transformers with a ChatML tokenizer
and template -> `import-hf` -> `chat --prompt` and the `openai` client against a real `serve` answer in
that template, with transformers' own greedy reply to apply_chat_template's ids; `export-hf` gives
transformers the tokenizer and template back; a template that raises is one line (CLI) or a 400 (server)."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch

from build_llm.cli import main
from build_llm.data.chat_template import chat_format
from build_llm.infer.chat import respond
from build_llm.serve.engine import Engine, Sequence
from build_llm.store.checkpoint import load_checkpoint
from build_llm.train.config import FinetuneConfig
from build_llm.train.finetune import prepare_instruction
from tiny import CHATML_TEMPLATE, LLAMA3_TEMPLATE, Server, free_port, write_chat_tokenizer

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e '.[test]')")
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM)

pytestmark = pytest.mark.usefixtures("one_thread")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there, how are you?"},
            {"role": "assistant", "content": "I am fine."}, {"role": "user", "content": "What is the capital?"}]
NEW = 10


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "chat-tiny"
    tok = write_chat_tokenizer(path, CHATML_TEMPLATE, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "imported"
    assert main(["import-hf", str(hf_dir), "--out", str(out)]) == 0
    return out


def hf_reply(hf_dir, messages, turn_end: str = "<|im_end|>") -> tuple[list[int], str]:
    """transformers' prompt ids and greedy reply, up to the end of the turn."""
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    stops = [tok.convert_tokens_to_ids(turn_end), tok.eos_token_id]
    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=stops,
                         pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    out = out[:next((i for i, t in enumerate(out) if t in stops), len(out))]
    return list(ids), tok.backend_tokenizer.decode(out, skip_special_tokens=False)


def test_a_tiny_llama_answers_in_its_llama3_template(tmp_path, capsys):
    """Llama 3's shape: bos_token and header tokens in the template, <|eot_id|> as eos; GQA weights."""
    hf_dir = tmp_path / "llama-chat-tiny"
    tok = write_chat_tokenizer(hf_dir, LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 tie_word_embeddings=False)).save_pretrained(hf_dir)
    ids, expected = hf_reply(hf_dir, MESSAGES[:2], "<|eot_id|>")
    assert ids[0] == tok.bos_token_id and len(expected) > NEW // 2
    assert main(["import-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 0
    assert chat_format(load_checkpoint(tmp_path / "run").tokenizer).encode(MESSAGES[:2], True)[0] == ids
    capsys.readouterr()
    assert main(["chat", "--checkpoint", str(tmp_path / "run"), "--system", MESSAGES[0]["content"], "--prompt",
                 MESSAGES[1]["content"], "--max-new-tokens", str(NEW)]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_import_hf_keeps_the_tokenizer_and_template(run_dir, hf_dir):
    assert (run_dir / "chat_template.jinja").read_text() == (hf_dir / "chat_template.jinja").read_text()
    ckpt = load_checkpoint(run_dir)
    ours = chat_format(ckpt.tokenizer)
    hf = AutoTokenizer.from_pretrained(hf_dir)
    assert ours.encode(MESSAGES, add_generation_prompt=True)[0] == list(
        hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert ckpt.tokenizer.eos_id == hf.eos_token_id and hf.convert_tokens_to_ids("<|im_end|>") in ours.stop_ids


def test_chat_prompt_answers_in_the_template(run_dir, hf_dir, capsys):
    _, expected = hf_reply(hf_dir, MESSAGES[:2])
    assert len(expected) > NEW // 2  # the random model's greedy reply runs on (no end of turn to stop it)
    code = main(["chat", "--checkpoint", str(run_dir), "--system", "Be brief.", "--prompt", MESSAGES[1]["content"],
                 "--max-new-tokens", str(NEW)])
    captured = capsys.readouterr()
    assert code == 0 and captured.out == expected + "\n" and "not instruction-tuned" not in captured.err


def test_a_reply_ends_at_the_templates_end_of_turn(run_dir):
    """A model whose every next token is <|im_end|> (the end of a turn, not the tokenizer's eos) says nothing."""
    ckpt = load_checkpoint(run_dir)
    im_end = ckpt.tokenizer.added_tokens["<|im_end|>"]
    with torch.no_grad():
        ckpt.model.final_norm.scale.zero_()
        ckpt.model.final_norm.shift.fill_(1.0)
        ckpt.model.tok_emb.weight[im_end] = 100.0  # the head is tied: im_end's logit dwarfs the others
    assert respond(ckpt.model, ckpt.tokenizer, MESSAGES[1:2], 5) == ""
    events, done = [], threading.Event()
    engine = Engine(ckpt.model, max_batch=1)  # serve's engine: the same stop ids end the sequence
    engine.start()
    try:
        emit = lambda kind, payload: (events.append((kind, payload)), kind == "done" and done.set())  # noqa: E731
        ids, _ = chat_format(ckpt.tokenizer).encode(MESSAGES[1:2], add_generation_prompt=True)
        engine.submit([Sequence(ids, 5, emit, stop_ids=frozenset(chat_format(ckpt.tokenizer).stop_ids))])
        assert done.wait(60) and [k for k, _ in events] == ["token", "done"] and events[-1][1] == "stop"
    finally:
        engine.stop()


def test_export_hf_gives_transformers_the_tokenizer_and_template(run_dir, hf_dir, tmp_path, capsys):
    assert main(["export-hf", "--checkpoint", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    exported, original = AutoTokenizer.from_pretrained(tmp_path / "out"), AutoTokenizer.from_pretrained(hf_dir)
    assert exported.chat_template == original.chat_template and exported.eos_token == original.eos_token
    assert exported.apply_chat_template(MESSAGES, add_generation_prompt=True) == \
        original.apply_chat_template(MESSAGES, add_generation_prompt=True)


def test_a_template_that_raises_is_one_line_and_exit_2(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)  # the run's template is a file a user can read and edit
    (broken / "chat_template.jinja").write_text("{{ raise_exception('This model only chats in French') }}")
    code = main(["chat", "--checkpoint", str(broken), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "This model only chats in French" in err
    (broken / "chat_template.jinja").write_text("{% for message in messages %}")  # not Jinja: refused at start
    code = main(["serve", "--checkpoint", str(broken), "--port", str(free_port())])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "the chat template is not valid Jinja" in err


# --- a real server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(run_dir):
    s = Server("--checkpoint", run_dir, "--name", "chat-tiny", "--max-batch", "2")
    try:
        yield openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
    finally:
        assert s.stop() == 0


def test_the_openai_client_gets_transformers_greedy_reply(server, hf_dir):
    ids, expected = hf_reply(hf_dir, MESSAGES)
    assert len(expected) > NEW // 2
    r = server.chat.completions.create(model="chat-tiny", messages=MESSAGES, max_tokens=NEW, temperature=0)
    assert r.choices[0].message.content == expected and r.usage.prompt_tokens == len(ids)
    parts = server.chat.completions.create(model="chat-tiny", messages=MESSAGES, max_tokens=NEW, temperature=0,
                                           stream=True)
    assert "".join(p.choices[0].delta.content or "" for p in parts) == expected


def test_content_as_a_list_of_text_parts_is_the_text(server, hf_dir):
    """The OpenAI format's content parts ([{"type": "text", "text": ...}], which clients and UIs send): the
    parts' texts joined by newlines, as vLLM gives a template that expects a string."""
    parted = [{**m, "content": [{"type": "text", "text": t} for t in m["content"].split(", ")]} for m in MESSAGES]
    joined = [{**m, "content": "\n".join(m["content"].split(", "))} for m in MESSAGES]
    _, expected = hf_reply(hf_dir, joined)
    r = server.chat.completions.create(model="chat-tiny", messages=parted, max_tokens=NEW, temperature=0)
    assert r.choices[0].message.content == expected
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    with pytest.raises(openai.BadRequestError, match="image_url"):
        server.chat.completions.create(model="chat-tiny", messages=image, max_tokens=2)


def test_a_template_that_raises_is_a_400_and_the_server_goes_on(server):
    misplaced = [MESSAGES[1], MESSAGES[0], MESSAGES[3]]  # the template wants the system message first
    with pytest.raises(openai.BadRequestError, match="System message must be first"):
        server.chat.completions.create(model="chat-tiny", messages=misplaced, max_tokens=2)
    assert server.chat.completions.create(model="chat-tiny", messages=MESSAGES[1:2], max_tokens=2).choices


def test_finetune_instruct_trains_in_the_template_and_chat_stops_at_its_end_of_turn(run_dir, hf_dir, tmp_path,
                                                                                    capsys):
    """The examples are apply_chat_template's ids with its assistant mask (the template marks the reply with
    {% generation %}); after training, the reply ends at <|im_end|>, which is not the tokenizer's eos."""
    conversation = [{"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": "Paris is the capital."}]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": conversation}) for _ in range(8)))
    hf = AutoTokenizer.from_pretrained(hf_dir)
    expected = hf.apply_chat_template(conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ft = prepare_instruction(data, None, load_checkpoint(run_dir).tokenizer, 100,
                             FinetuneConfig(task="instruct", val_fraction=0.25))
    assert ft.train[0].ids == list(expected["input_ids"])
    assert [int(r) for r in ft.train[0].target] == list(expected["assistant_masks"])
    assert main(["finetune", "instruct", "--init-from", str(run_dir), "--data", str(data), "--out",
                 str(tmp_path / "ft"), "--steps", "40", "--lr", "1e-2", "--val-fraction", "0.25"]) == 0
    capsys.readouterr()
    assert main(["chat", "--checkpoint", str(tmp_path / "ft"), "--prompt", conversation[0]["content"],
                 "--max-new-tokens", "30"]) == 0
    assert capsys.readouterr().out == "Paris is the capital.\n"


def test_import_hf_of_a_llama_without_tokenizer_json_stores_no_tokenizer(tmp_path, capsys):
    """GPT-2's tokenizer is the fallback for a GPT-2 only: another model's ids would mean other words."""
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=32)).save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert "has no tokenizer.json; the checkpoint has no tokenizer" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run").tokenizer is None



@pytest.mark.parametrize("extra, word", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
])
def test_tools_are_refused_not_ignored(extra, word):
    """A request that offers the model tools would get an answer rendered without them: a 400 naming them
    instead (an empty list offers none and is served)."""
    from build_llm.serve.protocol import ApiError, parse_messages
    with pytest.raises(ApiError, match=f"{word} are not supported"):
        parse_messages({"messages": MESSAGES, **extra})
    assert parse_messages({"messages": MESSAGES, word: []}) == MESSAGES
