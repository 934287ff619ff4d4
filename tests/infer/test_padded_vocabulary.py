"""A model whose embedding and head have more rows than its tokenizer has ids (Qwen pads its vocabulary): generate
and chat draw only the tokenizer's ids, greedy or sampled, and refuse prompt ids past them; inspect shows them alone. The padding's rows are
made here the most likely by far; they used to be drawn, and decoding them ended `build-llm generate` and
`build-llm chat` with exit 2 ("ids contains id(s) outside the vocabulary"), as it would have ended a training run
from such a model (--init-from) at its first sample."""

import dataclasses
import json

import pytest
import torch

from build_llm import GPTModel, generate, get_tokenizer, save_checkpoint
from build_llm.cli import main
from build_llm.errors import UsageError
from build_llm.infer.chat import stream_response
from build_llm.infer.generate import decodable_ids
from build_llm.inspect.intermediates import inspect_model
from build_llm.inspect.tables import next_token_distribution
from build_llm.train.pretrain import sample_text
from tiny import TINY

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = get_tokenizer("gpt2")  # 50,257 ids
PADDED = 50304  # rows of the embedding and head: 47 past the tokenizer's ids
X = TOK.encode(" x")[0]  # the tokenizer's most likely id, by far


@pytest.fixture(scope="module")
def padded():
    """Every position's last hidden state is all ones (emb_dim 16), so each logit is 16 x its head row's weight:
    the padding's 128, " x"'s 64, every other id's 0, whatever the prompt."""
    torch.manual_seed(0)
    model = GPTModel(dataclasses.replace(TINY, vocab_size=PADDED, context_length=64)).eval()
    with torch.no_grad():
        model.final_norm.scale.zero_()
        model.final_norm.shift.fill_(1.0)
        model.out_head.weight.zero_()
        model.out_head.weight[X] = 4.0
        model.out_head.weight[TOK.vocab_size:] = 8.0
    return model


@pytest.fixture(scope="module")
def checkpoint(padded, tmp_path_factory):
    path = tmp_path_factory.mktemp("padded") / "ckpt"
    save_checkpoint(path, padded, TOK)
    return path


def test_decodable_ids_are_those_both_know(padded):
    assert decodable_ids(padded, TOK) == TOK.vocab_size == 50257


def test_generate_draws_only_the_tokenizers_ids_and_refuses_others_in_the_prompt(padded):
    idx = torch.tensor([TOK.encode("hi")])
    for sampling in ({}, {"temperature": 1.0, "generator": torch.Generator().manual_seed(1)},
                     {"temperature": 1.0, "top_k": 200, "top_p": 0.9, "generator": torch.Generator().manual_seed(2)}):
        out = generate(padded, idx, 4, vocab_size=decodable_ids(padded, TOK), **sampling)
        assert out[0, idx.shape[1]:].tolist() == [X] * 4, sampling  # p(any other id) < 200 * e^-64
        # a caller without a tokenizer (the book's code) has every row of the head, as before
        assert (generate(padded, idx, 4, **sampling)[0, idx.shape[1]:] >= TOK.vocab_size).all(), sampling
    with pytest.raises(UsageError, match=r"outside \[0, 50257\).*\[50300\]"):
        generate(padded, torch.tensor([[1, 50300]]), 2, vocab_size=decodable_ids(padded, TOK))
    assert generate(padded, torch.tensor([[1, 50300]]), 1)[0, -1] >= TOK.vocab_size  # the model's own ids: as before


def test_a_chat_reply_draws_only_the_tokenizers_ids_and_its_prompt_holds_only_them(padded):
    for sampling in ({}, {"temperature": 1.0, "generator": torch.Generator().manual_seed(3)}):
        assert "".join(stream_response(padded, TOK, TOK.encode("hi"), [TOK.eos_id], 3, **sampling)) == " x x x"
    with pytest.raises(UsageError, match=r"outside \[0, 50257\)"):
        list(stream_response(padded, TOK, [1, 50257], [TOK.eos_id], 3))


@pytest.mark.parametrize("how", [["--greedy"], [], ["--temperature", "1.5", "--top-k", "50000"]])
def test_the_generate_verb_prints_only_the_tokenizers_text(checkpoint, capsys, how):
    code = main(["generate", "--checkpoint", str(checkpoint), "--prompt", "hi", "--max-new-tokens", "3", *how])
    out, err = capsys.readouterr()
    assert (code, out, err) == (0, "hi x x x\n", "")


def test_the_chat_verb_prints_only_the_tokenizers_text(checkpoint, capsys):
    for how in ([], ["--temperature", "1"]):
        code = main(["chat", "--checkpoint", str(checkpoint), "--prompt", "hi", "--max-new-tokens", "3", *how])
        out, err = capsys.readouterr()
        assert (code, out) == (0, " x x x\n"), err


def test_the_training_sample_draws_only_the_tokenizers_ids(padded):
    for top_k in (None, 40):  # greedy, and the report's top-k sampling
        assert sample_text(padded, TOK, "hi", 3, torch.device("cpu"), top_k=top_k) == "hi x x x"


def test_inspect_shows_the_distribution_generation_draws_from(padded, tmp_path):
    """next_token_distribution and inspect_model's table: the tokenizer's ids only (the padding's rows, 64 logits
    above " x", would have taken every place of the top-k and failed to decode)."""
    top = next_token_distribution(padded, TOK, "hi", k=3)
    assert top[0][:2] == (" x", X) and top[0][2] == pytest.approx(1.0) and all(i < TOK.vocab_size for _, i, _ in top)
    inspect_model(padded, TOK, "hi", tmp_path / "inspect", top_k=3)
    table = json.loads((tmp_path / "inspect" / "inspect.json").read_text())["next_token"]
    assert table[0]["id"] == X and all(row["id"] < TOK.vocab_size for row in table)
