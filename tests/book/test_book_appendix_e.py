"""The book's appendix E (LoRA) with build_llm imports: its parameter counts and its scaling."""

from __future__ import annotations

import torch

from build_llm import GPTModel
from build_llm.book.appendix_e import LinearWithLoRA, LoRALayer, replace_linear_with_lora

# The book's BASE_CONFIG for "gpt2-small (124M)" in chapter 6 / appendix E.
BASE_CONFIG = {"vocab_size": 50257, "context_length": 1024, "drop_rate": 0.0, "qkv_bias": True,
               "emb_dim": 768, "n_layers": 12, "n_heads": 12}


def test_the_books_parameter_counts():
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = GPTModel(BASE_CONFIG)
        for param in model.parameters():
            param.requires_grad = False
        model.out_head = torch.nn.Linear(in_features=768, out_features=2)
        total_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert total_params == 1_538
        for param in model.parameters():
            param.requires_grad = True
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 124_441_346  # "before"
        for param in model.parameters():
            param.requires_grad = False
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0  # "after"
        replace_linear_with_lora(model, rank=16, alpha=16)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2_666_528  # the book's LoRA count
    assert isinstance(model.out_head, LinearWithLoRA) and isinstance(model.trf_blocks[0].att.W_query, LinearWithLoRA)


def test_the_books_scaling_is_alpha():
    torch.manual_seed(123)
    layer = LoRALayer(4, 3, rank=2, alpha=8)
    with torch.no_grad():
        layer.B.fill_(1.0)
    x = torch.ones(1, 4)
    torch.testing.assert_close(layer(x), 8 * (x @ layer.A @ layer.B))
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 3)
    wrapped = LinearWithLoRA(linear, rank=2, alpha=8)
    assert wrapped.lora.scaling == 8 and torch.equal(wrapped(x), linear(x))
