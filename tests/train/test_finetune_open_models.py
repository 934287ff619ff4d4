"""LoRA instruction fine-tuning of today's open models, end to end, against transformers: a tiny random
Llama (Llama 3's template: bos and header tokens, <|eot_id|>) and Qwen3 (ChatML: <|im_end|> ends a turn,
<|endoftext|> is eos) saved by transformers with a tiny tokenizer and template -> `import-hf` ->
`finetune instruct --lora-rank` -> the loss falls, `chat --prompt` answers in the template and ends its
turn -> `merge-lora` computes what the adapter does (1e-5) -> `export-hf` loads in transformers with the
same logits and the same greedy reply to apply_chat_template's ids -> the `openai` client against a real
`serve` gets that reply too."""

from __future__ import annotations

import json

import pytest
import torch

from build_llm.cli import main
from build_llm.store.checkpoint import load_checkpoint
from build_llm.store.finetuned import load_finetuned
from build_llm.train.config import FinetuneConfig
from build_llm.train.finetune import evaluate, prepare_instruction
from tiny import CHATML_TEMPLATE, LLAMA3_TEMPLATE, Server, write_chat_tokenizer

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai", reason="the openai client is a test dependency (pip install -e '.[test]')")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]
QA = [("What is the capital of France?", "Paris is the capital."), ("Hello there, how are you?", "I am fine, thank you.")]
FAMILIES = {  # (transformers config, template, special tokens, LoRA targets: PEFT's names or ours)
    "llama": (dict(model_type="llama", tie_word_embeddings=False), LLAMA3_TEMPLATE,
              dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
              "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
    "qwen3": (dict(model_type="qwen3", head_dim=16, tie_word_embeddings=True), CHATML_TEMPLATE,
              dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>"), "attn,ff"),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def runs(request, tmp_path_factory):
    """(family, the transformers tokenizer directory, the imported run, the LoRA run, the merged run)."""
    name = request.param
    options, template, specials, targets = FAMILIES[name]
    root = tmp_path_factory.mktemp(name)
    tok = write_chat_tokenizer(root / "hf", template, **specials)
    config = transformers.AutoConfig.for_model(
        options["model_type"], vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, initializer_range=0.3,  # logits loud enough to become confident
        **{k: v for k, v in options.items() if k != "model_type"})  # through the frozen final norm and head
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "hf")
    data = root / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                       {"role": "assistant", "content": a}]})
                              for q, a in QA * 6))
    assert main(["import-hf", str(root / "hf"), "--out", str(root / "base")]) == 0
    assert main(["finetune", "instruct", "--init-from", str(root / "base"), "--data", str(data), "--out",
                 str(root / "lora"), "--lora-rank", "8", "--lora-alpha", "16", "--lora-targets", targets,
                 "--steps", "60", "--lr", "2e-2", "--batch-size", "4", "--val-fraction", "0.2",
                 "--eval-every", "20"]) == 0
    assert main(["merge-lora", "--checkpoint", str(root / "lora"), "--out", str(root / "merged")]) == 0
    assert main(["export-hf", "--checkpoint", str(root / "merged"), "--out", str(root / "export")]) == 0
    return name, root / "hf", root / "base", root / "lora", root / "merged", root / "export"


def test_the_validation_loss_falls(runs):
    """From the base's loss on the same validation replies (in the template, end of turn included)."""
    _, _, base, lora, *_ = runs
    ckpt = load_checkpoint(base)
    data = prepare_instruction(lora.parent / "chat.jsonl", None, ckpt.tokenizer, 128,
                               FinetuneConfig(task="instruct", val_fraction=0.2))
    before = evaluate(ckpt.model, data, ckpt.tokenizer.eos_id, 128, torch.device("cpu"))["val_loss"]
    rows = [json.loads(line) for line in (lora / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(losses) == 3 and losses[-1] < 0.1 * before


def test_merged_computes_what_the_adapter_does(runs):
    name, _, base, lora, merged, _ = runs
    # in float64, so that 1e-5 measures the merge (its weights rounded to float32 once), not the sums' rounding
    adapted, plain = load_finetuned(lora).model.double(), load_checkpoint(merged).model.double()
    assert load_finetuned(lora).meta["lora"]["targets"] == FAMILIES[name][3].split(",")
    idx = torch.randint(0, plain.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = adapted(idx)
        torch.testing.assert_close(plain(idx), expected, atol=1e-5, rtol=0)
        assert (load_checkpoint(base).model.double()(idx) - expected).abs().max() > 1e-2  # training changed it


def hf_reply(export, question: str) -> str:
    """transformers' greedy reply (the exported model and tokenizer) to apply_chat_template's ids."""
    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    turn_end = tok.convert_tokens_to_ids("<|im_end|>" if "<|im_end|>" in tok.chat_template else "<|eot_id|>")
    stops = [turn_end, tok.eos_token_id]
    out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False, eos_token_id=stops,
                         pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    assert out[-1] in stops  # the reply ended its turn
    return tok.decode(out[:-1])


def test_the_export_loads_in_transformers_with_equal_logits_and_the_trained_reply(runs):
    _, _, _, _, merged, export = runs
    ours = load_checkpoint(merged).model
    theirs = AutoModelForCausalLM.from_pretrained(export).eval()
    idx = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx), atol=1e-4, rtol=0)
    assert hf_reply(export, QA[0][0]) == QA[0][1]


def test_chat_answers_in_the_template_from_the_adapter_and_the_merge(runs, capsys):
    _, _, _, lora, merged, export = runs
    for checkpoint in (lora, merged):
        for question, answer in QA:
            capsys.readouterr()
            assert main(["chat", "--checkpoint", str(checkpoint), "--prompt", question, "--max-new-tokens", "20"]) == 0
            assert capsys.readouterr().out == answer + "\n"
    assert hf_reply(export, QA[1][0]) == QA[1][1]


def test_the_openai_client_against_serve_gets_chats_greedy_reply(runs, capsys):
    merged = runs[4]
    server = Server("--checkpoint", merged, "--name", "tiny")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        for question, answer in QA:
            capsys.readouterr()
            assert main(["chat", "--checkpoint", str(merged), "--prompt", question, "--max-new-tokens", "20"]) == 0
            said = capsys.readouterr().out.rstrip("\n")
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                               max_tokens=20, temperature=0)
            assert r.choices[0].message.content == said == answer and r.choices[0].finish_reason == "stop"
    finally:
        assert server.stop() == 0
