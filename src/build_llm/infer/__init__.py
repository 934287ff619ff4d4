"""Using a trained model: sampling and the KV cache, bf16/int8 decoding kernels, chat, classification."""
