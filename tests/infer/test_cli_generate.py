"""`build-llm generate` streams: each token's text is written (and flushed) as soon as it is
generated, and stdout is exactly the prompt and its continuation."""

import subprocess
import sys

import pytest
import torch

from build_llm import GPTModel, generate, get_tokenizer, load_model, save_checkpoint, text_to_token_ids
from build_llm.cli import main
from tiny import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "ckpt"
    torch.manual_seed(0)
    model = GPTModel(TINY)
    save_checkpoint(path, model, get_tokenizer("gpt2"))
    return path


class Recorder:
    """A stdout that notes, at each write and flush, how many model forwards had run."""

    def __init__(self, forwards):
        self.forwards, self.events, self.text = forwards, [], ""

    def write(self, s):
        self.events.append(("write", self.forwards[0]))
        self.text += s
        return len(s)

    def flush(self):
        self.events.append(("flush", self.forwards[0]))


def test_tokens_are_printed_as_they_are_generated(checkpoint, monkeypatch):
    forwards = [0]

    def count(module, args, output):
        if isinstance(module, GPTModel):
            forwards[0] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    out = Recorder(forwards)
    monkeypatch.setattr(sys, "stdout", out)
    try:
        assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "Once upon a time",
                     "--max-new-tokens", "40", "--temperature", "1.0", "--seed", "5"]) == 0
    finally:
        handle.remove()
    writes = [n for kind, n in out.events if kind == "write"]
    assert writes[0] == 0 and out.text.startswith("Once upon a time")  # the prompt before any forward
    assert len(set(writes)) > 20  # text written after most of the 40 steps, not once at the end
    # every write is flushed at once
    assert all(out.events[i + 1][0] == "flush" for i, (kind, _) in enumerate(out.events[:-1]) if kind == "write")

    # Exactly the prompt and the continuation that generate() gives for the same seed, then a newline.
    model, tok = load_model(checkpoint), get_tokenizer("gpt2")
    idx = text_to_token_ids("Once upon a time", tok)
    expected = generate(model, idx, 40, temperature=1.0, eos_id=tok.eos_id,
                        generator=torch.Generator().manual_seed(5))
    assert out.text == tok.decode(expected[0].tolist()) + "\n"


def test_streamed_output_through_a_pipe_is_the_same_text(checkpoint):
    args = ["generate", "--checkpoint", str(checkpoint), "--prompt", "The", "--max-new-tokens", "8"]
    result = subprocess.run([sys.executable, "-m", "build_llm.cli", *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    model, tok = load_model(checkpoint), get_tokenizer("gpt2")
    expected = generate(model, text_to_token_ids("The", tok), 8, eos_id=tok.eos_id)
    assert result.stdout == tok.decode(expected[0].tolist()) + "\n" and result.stderr == ""
