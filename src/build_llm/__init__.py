"""build-llm: build, train, inspect and sample GPT language models from scratch."""

from build_llm.data.tokenizer import install_offline_gpt2

install_offline_gpt2()  # so that tiktoken.get_encoding("gpt2") works with no network

from build_llm.attention import KVCache, MultiHeadAttention  # noqa: E402
from build_llm.activation import GELU  # noqa: E402
from build_llm.store.checkpoint import load_checkpoint, load_model, save_checkpoint  # noqa: E402
from build_llm.config import PRESETS, GPTConfig  # noqa: E402
from build_llm.infer.generate import generate, generate_text_simple, stream, text_to_token_ids, token_ids_to_text  # noqa: E402
from build_llm.gpt import GPTModel  # noqa: E402
from build_llm.layer import LayerNorm  # noqa: E402
from build_llm.mlp import FeedForward  # noqa: E402
from build_llm.inspect.intermediates import return_intermediates  # noqa: E402
from build_llm.inspect.tables import next_token_distribution  # noqa: E402
from build_llm.sizing import count_parameters, model_size_mb, parameter_table  # noqa: E402
from build_llm.runtime import get_device, set_seed  # noqa: E402
from build_llm.data.tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer, get_tokenizer, load_tokenizer  # noqa: E402
from build_llm.transformer import TransformerBlock  # noqa: E402

__all__ = [
    "GPTConfig", "PRESETS", "GPTModel", "TransformerBlock", "LayerNorm", "MultiHeadAttention", "KVCache",
    "FeedForward", "GELU", "generate", "generate_text_simple", "stream", "text_to_token_ids",
    "token_ids_to_text", "get_tokenizer", "load_tokenizer", "GPT2Tokenizer", "CharTokenizer", "BPETokenizer",
    "set_seed", "get_device", "count_parameters", "parameter_table", "model_size_mb", "return_intermediates",
    "next_token_distribution", "save_checkpoint", "load_checkpoint", "load_model",
]
