"""build-llm: build, train, inspect and sample GPT language models from scratch."""

from .tokenizer import install_offline_gpt2

install_offline_gpt2()  # so that tiktoken.get_encoding("gpt2") works with no network

from .attention import KVCache, MultiHeadAttention  # noqa: E402
from .activation import GELU  # noqa: E402
from .checkpoint import load_checkpoint, load_model, save_checkpoint  # noqa: E402
from .config import PRESETS, GPTConfig  # noqa: E402
from .generate import generate, generate_text_simple, stream, text_to_token_ids, token_ids_to_text  # noqa: E402
from .gpt import GPTModel  # noqa: E402
from .layer import LayerNorm  # noqa: E402
from .mlp import FeedForward  # noqa: E402
from .probe import count_parameters, model_size_mb, next_token_distribution, parameter_table, return_intermediates  # noqa: E402
from .runtime import get_device, set_seed  # noqa: E402
from .tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer, get_tokenizer, load_tokenizer  # noqa: E402
from .transformer import TransformerBlock  # noqa: E402

__all__ = [
    "GPTConfig", "PRESETS", "GPTModel", "TransformerBlock", "LayerNorm", "MultiHeadAttention", "KVCache",
    "FeedForward", "GELU", "generate", "generate_text_simple", "stream", "text_to_token_ids",
    "token_ids_to_text", "get_tokenizer", "load_tokenizer", "GPT2Tokenizer", "CharTokenizer", "BPETokenizer",
    "set_seed", "get_device", "count_parameters", "parameter_table", "model_size_mb", "return_intermediates",
    "next_token_distribution", "save_checkpoint", "load_checkpoint", "load_model",
]
