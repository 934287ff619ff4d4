"""Tiny models and the small data sets they learn in a few steps, shared by the tests (plain names, imported
by name: `from tiny import TINY`; the fixtures built from them are in conftest.py), and a real `build-llm
serve` in its own process."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

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


# --- chat templates: written for the tests in the style of two real families --------------------------------
# ChatML as Qwen writes it: a default system turn, <|im_start|>ROLE ... <|im_end|>, the assistant's text inside
# {% generation %} (so transformers can report which tokens are the assistant's), a system message anywhere
# but first refused with raise_exception.
CHATML_TEMPLATE = """{%- for message in messages %}
{%- if loop.first and message.role != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
{%- if message.role == 'system' and not loop.first %}
{{- raise_exception('System message must be first') }}
{%- endif %}
{%- if message.role == 'assistant' %}
<|im_start|>assistant
{% generation %}{{ message.content }}<|im_end|>{% endgeneration %}

{% else %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
    {% endif %}"""

# Llama 3's shape: bos_token, header tokens, a dated system turn (strftime_now), trimmed contents, tools
# as JSON when given, alternation checked, `continue` and a namespace.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(system="") %}
{%- if messages[0].role == 'system' %}{% set ns.system = messages[0].content | trim %}{% endif %}
<|start_header_id|>system<|end_header_id|>

Today Date: {{ strftime_now("%d %b %Y") }}
{% if tools is not none %}{{ tools | tojson }}
{% endif %}
{{ ns.system }}<|eot_id|>
{%- for message in messages %}
{%- if message.role == 'system' %}{% continue %}{% endif %}
{%- if (message.role == 'user') != (loop.index0 % 2 == (1 if messages[0].role == 'system' else 0)) %}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
{%- endif %}
<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content | trim }}<|eot_id|>
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

CHAT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eot_id|>")


def write_chat_tokenizer(directory, template: str, **special_tokens: str):
    """A tiny byte-level BPE with the chat specials, trained with `tokenizers` and saved by transformers'
    PreTrainedTokenizerFast.save_pretrained with `template` and `special_tokens` (bos_token=..., ...):
    the files a Hugging Face chat model's directory holds. Returns the transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ("You are a helpful assistant. Hello there, how are you today? I am fine, thank you. What is the capital "
            "of France? Paris is the capital. system user assistant Today Date: Grüße 日本 ") * 20
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=list(CHAT_SPECIALS),
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **special_tokens)
    hf.save_pretrained(directory)
    return hf


# --- a real server ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`build-llm serve FLAGS...` on a free port of 127.0.0.1, in its own process: ready once /health answers;
    `stop()` sends SIGTERM (as a user's Ctrl-C or a service manager does) and gives the exit code."""

    def __init__(self, *flags: str | Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "build_llm.cli", "serve", *map(str, flags), "--port", str(self.port)]
        # Its output goes to a file: a pipe nobody reads while it runs would block a server that prints 64 KB.
        self.log = tempfile.TemporaryFile("w+")
        env = {k: v for k, v in os.environ.items() if k != "BUILD_LLM_API_KEY"}  # a key only where FLAGS give one
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.time() + 300  # generous: a loaded machine can take minutes to import torch
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not come up in 300 s")

    def output(self) -> str:
        """What the server printed so far (standard output and error)."""
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def int8_groups(x, group: int = 64):
    """x (rows, k) as int4's kernels take it (the spec, computed here on its own): each group of `group` columns
    rounded to int8 with scale max |x| / 127 in float32 (ties to even; an all-zero group, or one so small that
    1 / scale overflows float32, stays zero; a group holding a NaN or an infinity is all NaN), given back in
    float64."""
    rows, k = x.shape
    kp = -(-k // group) * group
    padded = torch.zeros(rows, kp)
    padded[:, :k] = x
    grouped = padded.view(rows, kp // group, group)  # (rows, groups, group)
    top = grouped.abs().amax(2, keepdim=True)  # NaN where the group holds a NaN
    bad, step = ~torch.isfinite(top), top / 127
    inv = 1 / step  # float32, as the kernel computes it
    zero = ~torch.isfinite(inv) & ~bad
    q = torch.where(bad | zero, 0.0, torch.round(grouped * inv))  # round: ties to even
    assert q.abs().max() <= 127
    scale = torch.where(bad, torch.nan, torch.where(zero, 1.0, step))
    return (q.double() * scale.double()).view(rows, kp)[:, :k]


def int8_groups_bound(x, w, group: int = 64):
    """The most that rounding x (rows, k) to int8 per group of `group` columns can move x @ w.T: half a step
    (max |x| of the group / 254) on each input, times |w|, summed: (rows, out) float64."""
    rows, k = x.shape
    steps = torch.zeros(rows, -(-k // group) * group, dtype=torch.float64)
    steps[:, :k] = x.double().abs()
    half = steps.view(rows, -1, group).amax(2, keepdim=True).expand(-1, -1, group).reshape(rows, -1)[:, :k] / 254
    return half @ w.double().abs().T
