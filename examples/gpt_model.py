# %% [markdown]
# # GPT model: the seed notebook 000 on top of `build_llm`
#
# The book's chapter 4 `GPTModel` (a GPT-2-style decoder-only transformer) built from the package:
# configuration, model, tensor shapes, parameter count and size, and greedy generation. With seed
# 123 on a CPU it prints the seed notebook's own numbers; the `check` lines say so.
#
# Run it as a script (`python examples/gpt_model.py`) or open `examples/gpt_model.ipynb` in Jupyter:
# the notebook holds this file's `# %%` cells (`jupytext --to ipynb --set-kernel python3
# examples/gpt_model.py` rewrites it after a change; a test checks that the two match).

# %%
import tiktoken
import torch

from build_llm import GPTConfig, GPTModel, count_parameters, generate_text_simple, model_size_mb, set_seed
from build_llm.sizing import format_parameter_table


def check(name: str, got, expected) -> None:
    """Print a value beside the seed's; stop if they differ."""
    ok = got == expected
    print(f"check {name}: {'same as the seed' if ok else f'DIFFERS from the seed ({expected!r})'}")
    if not ok:
        raise SystemExit(1)


tokenizer = tiktoken.get_encoding("gpt2")  # offline: build_llm ships GPT-2's vocabulary files
print(torch.__version__, "| CUDA available:", torch.cuda.is_available())

# %% [markdown]
# ## Configuration: the seed's `GPT_CONFIG_124M`, also the preset `book-124m`

# %%
set_seed(123)
GPT_CONFIG_124M = {
    "vocab_size": 50257,  # vocabulary size
    "context_length": 1024,  # context length
    "emb_dim": 768,  # embedding dimension
    "n_heads": 12,  # attention heads
    "n_layers": 12,  # transformer blocks
    "drop_rate": 0.1,  # dropout
    "qkv_bias": False,  # bias in the query, key and value projections
}
assert GPTConfig.from_dict(GPT_CONFIG_124M) == GPTConfig.from_preset("book-124m")

# %% [markdown]
# ## A batch of token ids (B, T) in, logits (B, T, V) out

# %%
batch = torch.stack([torch.tensor(tokenizer.encode("O gato dorme no"))], dim=0)
print(batch)
check("token ids", batch.tolist(), [[46, 308, 5549, 18586, 68, 645]])

model = GPTModel(GPT_CONFIG_124M)  # training mode, as in the seed: dropout is active
out = model(batch)
print("Input batch:\n", batch)
print("\nOutput shape:", out.shape)
print(out)
check("first logits", [round(v, 4) for v in out[0, 0, :3].tolist()], [-0.0545, -0.7861, 0.9106])

# %% [markdown]
# ## Parameters and size
# The output head is not tied to the token embedding here, so both 50257 x 768 matrices count.

# %%
print(format_parameter_table(model).split("\n")[0], "...")
total_params = count_parameters(model)
print(f"Total parameters: {total_params:,}")
print("Token embedding:", model.tok_emb.weight.shape, "| output head:", model.out_head.weight.shape)
print(f"Size: {model_size_mb(model, torch.float32):.2f} MB (fp32)")
check("parameters", total_params, 163_009_536)
check("size in MB", f"{model_size_mb(model):.2f}", "621.83")

# %% [markdown]
# ## Greedy generation: six new tokens (nonsense: the model is untrained)

# %%
encoded = tokenizer.encode("O gato sobe no")
encoded_tensor = torch.tensor(encoded).unsqueeze(0)
print("encoded:", encoded, "| shape:", tuple(encoded_tensor.shape))
model.eval()  # no dropout
out = generate_text_simple(model=model, idx=encoded_tensor, max_new_tokens=6,
                           context_size=GPT_CONFIG_124M["context_length"])
print("Output:", out)
print("Output length:", len(out[0]))
print(tokenizer.decode(out.squeeze(0).tolist()))
check("generated ids", out[0].tolist(), [46, 308, 5549, 523, 1350, 645, 34381, 37516, 12434, 42030, 37383, 678])
