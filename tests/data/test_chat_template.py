"""Chat templates rendered as transformers renders them: the same token ids as `apply_chat_template` on two
templates in the style of real families, the same assistant tokens as its `return_assistant_tokens_mask`, the
tokenizer's side files read as AutoTokenizer reads them, and a template that fails or misbehaves refused."""

from __future__ import annotations

import json

import pytest

from build_llm.data.chat_template import AlpacaChat, JinjaChat, chat_format
from build_llm.data.special_tokens import TokenizerConfig, read_tokenizer_config
from build_llm.data.tokenizer import BPETokenizer, load_tokenizer
from build_llm.errors import UsageError
from tiny import CHATML_TEMPLATE, LLAMA3_TEMPLATE, write_chat_tokenizer

transformers = pytest.importorskip("transformers")

SYSTEM = {"role": "system", "content": "Be brief. Answer in one line."}
TURNS = [{"role": "user", "content": "Hello there, how are you?"},
         {"role": "assistant", "content": "  I am fine, thank you.  "},
         {"role": "user", "content": "What is the capital of France? <b>&</b> Grüße 日本"},
         {"role": "assistant", "content": "Paris."},
         {"role": "user", "content": "And of <|im_end|> Japan?"}]
CONVERSATIONS = [TURNS[:1], TURNS, [SYSTEM, *TURNS], [SYSTEM, *TURNS[:4]], TURNS[:4]]


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def family(request, tmp_path_factory):
    """(transformers' tokenizer, ours) loaded from the same directory."""
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "chatml":  # as Qwen's base models: the end of text is not the end of a turn
        hf = write_chat_tokenizer(path, CHATML_TEMPLATE, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    else:
        hf = write_chat_tokenizer(path, LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    hf = transformers.AutoTokenizer.from_pretrained(path)
    return hf, load_tokenizer(path)


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_the_template_gives_transformers_token_ids(family, conversation, generation_prompt):
    hf, ours = family
    messages = CONVERSATIONS[conversation]
    chat = chat_format(ours)
    assert isinstance(chat, JinjaChat)
    expected = hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                      return_dict=False)
    assert chat.render(messages, generation_prompt) == hf.apply_chat_template(
        messages, add_generation_prompt=generation_prompt, tokenize=False)
    ids, _ = chat.encode(messages, generation_prompt)
    assert ids == list(expected)


def test_the_assistant_tokens_are_transformers_generation_mask(tmp_path):
    """The ChatML template marks the assistant's text and end of turn with {% generation %}: transformers'
    mask is the reference for the tokens fine-tuning trains on (found without the marks)."""
    hf = write_chat_tokenizer(tmp_path, CHATML_TEMPLATE, eos_token="<|endoftext|>")
    ours = load_tokenizer(tmp_path)
    for messages in ([SYSTEM, *TURNS[:4]], TURNS[:2]):
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, is_response = chat_format(ours).encode(messages)
        assert ids == list(out["input_ids"]) and [int(r) for r in is_response] == list(out["assistant_masks"])
        assert sum(is_response) > 0


def test_the_side_files_give_the_special_tokens_and_stop_ids(family):
    hf, ours = family
    assert ours.eos_id == hf.eos_token_id
    assert ours.token_id("bos_token") == hf.bos_token_id
    assert ours.token_id("pad_token") == hf.pad_token_id
    chat = chat_format(ours)
    # the turn's end is a stop id even where eos is another token (ChatML with <|endoftext|> as eos)
    turn_end = "<|im_end|>" if "<|im_start|>" in chat.source else "<|eot_id|>"
    assert hf.convert_tokens_to_ids(turn_end) in chat.stop_ids and hf.eos_token_id in chat.stop_ids


def test_side_files_as_transformers_reads_them(tmp_path):
    """An eos list in generation_config.json, the named-list template form, special_tokens_map.json's older
    role, and chat_template.jinja winning over tokenizer_config.json's template."""
    write_chat_tokenizer(tmp_path, "unused", eos_token="<|endoftext|>")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)
    config["chat_template"] = [{"name": "default", "template": "A{{ eos_token }}"}, {"name": "tool_use", "template": "B"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 6]}))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.config.eos_token == "<|im_end|>" and tok.eos_id == 2 and tok.stop_ids == (2, 6)
    assert chat_format(tok).render([{"role": "user", "content": "x"}]) == "A<|im_end|>"
    (tmp_path / "saved").mkdir()
    tok.save_to(tmp_path / "saved")  # named templates go back as tokenizer_config.json's list, as transformers reads
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "saved").chat_template == tok.config.chat_template
    assert json.loads((tmp_path / "saved" / "generation_config.json").read_text())["eos_token_id"] == [2, 6]
    (tmp_path / "chat_template.jinja").write_text("C")
    assert read_tokenizer_config(tmp_path).chat_template == "C"


def test_a_checkpoint_keeps_the_tokenizer_and_template(family, tmp_path):
    hf, ours = family
    written = ours.save_to(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(written)
    again = load_tokenizer(tmp_path)
    assert again.config == ours.config
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)  # and transformers reads them back
    assert reloaded.apply_chat_template(TURNS, tokenize=True, return_dict=False) == \
        hf.apply_chat_template(TURNS, tokenize=True, return_dict=False)


def test_without_a_template_the_package_format_is_used(tokenizer):
    assert isinstance(chat_format(tokenizer), AlpacaChat) and chat_format(tokenizer).stop_ids == (tokenizer.eos_id,)


def chat_with(tokenizer: BPETokenizer, template: str) -> JinjaChat:
    return JinjaChat(BPETokenizer(tokenizer.hf_tokenizer, TokenizerConfig(chat_template=template)), template)


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('Only user and assistant roles are supported') }}", "Only user and assistant roles"),
    ("{{ messages[5].content.upper() }}", "failed on this conversation"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    ("{{ messages.append(1) }}", "unsafe"),
    ("{{ 'x' * 1000000000 }}", "too large"),
    ("{{ 2 ** 100000000 }}", "too large"),
])
def test_a_failing_or_escaping_template_is_one_usage_error(tokenizer, template, message):
    with pytest.raises(UsageError, match=message) as e:
        chat_with(tokenizer, template).render([{"role": "user", "content": "hi"}])
    assert "\n" not in str(e.value)


HUGE = "{% for i in range(100000) %}{% for j in range(100000) %}{{ 'xyz' }}{% endfor %}{% endfor %}"


def test_a_template_that_renders_without_end_is_stopped(tokenizer, monkeypatch):
    """Loops nested in a downloaded template could build text without bound (each range is the sandbox's
    100,000 at most, their product is not): rendering stops at a size and a time that no chat reaches."""
    import build_llm.data.chat_template as chat_template

    monkeypatch.setattr(chat_template, "MAX_RENDER_CHARS", 30_000)
    with pytest.raises(UsageError, match="longer than 30000 characters"):
        chat_with(tokenizer, HUGE).render([{"role": "user", "content": "hi"}])
    monkeypatch.setattr(chat_template, "MAX_RENDER_CHARS", 10 ** 12)
    monkeypatch.setattr(chat_template, "MAX_RENDER_SECONDS", 0.2)
    with pytest.raises(UsageError, match="longer than 0.2 s"):
        chat_with(tokenizer, HUGE).render([{"role": "user", "content": "hi"}])


def test_a_template_that_is_not_jinja_is_refused_at_load(tokenizer):
    with pytest.raises(UsageError, match="not valid Jinja"):
        chat_with(tokenizer, "{% for m in messages %}")


def test_named_templates_without_a_default_are_refused(tokenizer):
    tok = BPETokenizer(tokenizer.hf_tokenizer, TokenizerConfig(chat_template={"tool_use": "x"}))
    with pytest.raises(UsageError, match="none named 'default'"):
        chat_format(tok)


def test_side_files_naming_a_token_not_in_the_vocabulary_are_refused(tokenizer):
    with pytest.raises(UsageError, match="not in its vocabulary"):
        BPETokenizer(tokenizer.hf_tokenizer, TokenizerConfig(eos_token="<|im_end|>"))


FEATURES = """{%- for m in messages %}{% if loop.index > 4 %}{% break %}{% endif %}
{{ m | tojson }}|{{ m | tojson(indent=2) }}|{{ dict(a=1, b=m.role) | tojson(sort_keys=True) }}
{%- endfor %}{{ eos_token }}{{ bos_token is defined }}{{ strftime_now('%Y') }}{{ documents is none }}"""


def test_tojson_loop_controls_and_context_as_transformers(family):
    """transformers' tojson (no HTML escaping, non-ASCII kept, its options), break, dict, the special tokens
    that are set and no others, strftime_now, documents."""
    hf, ours = family
    expected = hf.apply_chat_template(CONVERSATIONS[2], chat_template=FEATURES, tokenize=False)
    assert "<b>&</b> Grüße" in expected
    assert JinjaChat(ours, FEATURES).render(CONVERSATIONS[2]) == expected


# What the larger real templates lean on: reversed slices, string methods, `is string`, `items`, namespaces
# updated in loops, loop.last, whitespace control.
CONSTRUCTS = """{%- set ns = namespace(last_user=-1, words=[]) %}
{%- for m in messages[::-1] %}{% if m.role == 'user' and ns.last_user < 0 %}{% set ns.last_user = messages|length - 1 - loop.index0 %}{% endif %}{% endfor %}
{%- for m in messages %}
{%- if m.content is string and m.content.startswith('What') %}{{ m.content.split('?')[0].lstrip().upper() }}{% endif %}
{%- for k, v in m | items %}{{ k }}={{ v | length }};{% endfor %}
{{- '!' if loop.last else ',' }}{{ loop.index0 == ns.last_user }}
{%- endfor %}"""


def test_the_constructs_real_templates_use_render_as_in_transformers(family):
    hf, ours = family
    expected = hf.apply_chat_template(CONVERSATIONS[2], chat_template=CONSTRUCTS, tokenize=False)
    assert "WHAT IS THE CAPITAL OF FRANCE" in expected
    assert JinjaChat(ours, CONSTRUCTS).render(CONVERSATIONS[2]) == expected


def test_a_chat_prompt_does_not_need_the_replies_verbatim(family):
    """A template may rewrite earlier replies (Qwen3 drops their <think> part): a prompt to generate from
    is still transformers'; only training, which must find each reply, refuses it in one line."""
    hf, ours = family
    rewriting = CHATML_TEMPLATE.replace("{{ message.content }}<|im_end|>{% endgeneration %}",
                                        "{{ message.content.split('</think>')[-1] }}<|im_end|>{% endgeneration %}")
    messages = [TURNS[0], {"role": "assistant", "content": "<think>hmm</think>Fine."}, TURNS[2]]
    chat = JinjaChat(ours, rewriting)
    assert chat.prompt(messages) == hf.apply_chat_template(messages, chat_template=rewriting,
                                                           add_generation_prompt=True, tokenize=True,
                                                           return_dict=False)
    with pytest.raises(UsageError, match="does not render assistant message 2's text as it is given"):
        chat.encode(messages)
