"""Chapter 4, implementing a GPT model from scratch: the package's model under the book's names.

Everything here is the package's own class or function (`GPTModel` is `build_llm.GPTModel`, and so
on), plus the chapter's two teaching helpers for shortcut connections. `GPTModel(GPT_CONFIG_124M)`
builds the book's 163,009,536-parameter model; with `torch.manual_seed(123)` its weights, and so
its outputs, are the book's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from build_llm.activation import GELU
from build_llm.attention import MultiHeadAttention
from build_llm.errors import UsageError
from build_llm.infer.generate import generate_text_simple
from build_llm.gpt import GPTModel
from build_llm.layer import LayerNorm
from build_llm.mlp import FeedForward
from build_llm.transformer import TransformerBlock

__all__ = ["GPT_CONFIG_124M", "GPTModel", "TransformerBlock", "MultiHeadAttention", "LayerNorm", "GELU",
           "FeedForward", "generate_text_simple", "ExampleDeepNeuralNetwork", "print_gradients"]

# The chapter's configuration: GPT-2 small's shape with the book's choices (no QKV bias, untied head).
GPT_CONFIG_124M = {
    "vocab_size": 50257,
    "context_length": 1024,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}


class ExampleDeepNeuralNetwork(nn.Module):
    """Section 4.4's five Linear + GELU layers, with or without shortcut (residual) connections,
    to show how shortcuts keep the first layers' gradients from vanishing."""

    def __init__(self, layer_sizes: list[int], use_shortcut: bool) -> None:
        super().__init__()
        if len(layer_sizes) < 2:
            raise UsageError(f"layer_sizes={layer_sizes!r} is invalid; expected at least two sizes (input, output)")
        self.use_shortcut = use_shortcut
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(n_in, n_out), GELU())
                                     for n_in, n_out in zip(layer_sizes[:-1], layer_sizes[1:])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            layer_output = layer(x)
            # A shortcut only where the shapes allow it (not into the last, narrower layer)
            x = x + layer_output if self.use_shortcut and x.shape == layer_output.shape else layer_output
        return x


def print_gradients(model: nn.Module, x: torch.Tensor) -> None:
    """Backpropagate the squared error of model(x) against 0 and print each weight's mean |gradient|."""
    output = model(x)
    loss = nn.MSELoss()(output, torch.zeros_like(output))
    loss.backward()
    for name, param in model.named_parameters():
        if "weight" in name:
            print(f"{name} has gradient mean of {param.grad.abs().mean().item()}")
