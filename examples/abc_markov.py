# %% [markdown]
# # The ABC text: the seed notebook 003 (IME-USP) on top of `build_llm`
#
# A tiny character-level GPT learns synthetic "ABC" text: the words `AABCBBC`, `BCABCCA` and
# `CAAACB\n\n`, drawn independently with probabilities 0.4, 0.4 and 0.2. The model is an estimator
# of P(X_{t+1} | X_1..X_t); because the process is known, so is the best possible estimator, and
# the notebook's questions get exact answers: how far is the model from the optimum, and where?
#
# Run it as a script (`python examples/abc_markov.py`) or open `examples/abc_markov.ipynb` in Jupyter
# (this file's `# %%` cells; `jupytext --to ipynb --set-kernel python3 examples/abc_markov.py`
# rewrites it after a change, and a test checks that the two match).
# Environment variables make it quick: ABC_STEPS (training steps, default 800), ABC_WORDS (words
# of text, default the notebook's 150000), ABC_NEW_TOKENS (generated characters, default 700),
# ABC_OUT (output directory, default runs/abc-markov-example).

# %%
import math
import os
from pathlib import Path

import numpy as np
import torch

from build_llm import CharTokenizer, GPTConfig, GPTModel, generate, set_seed, text_to_token_ids, token_ids_to_text

from build_llm.data.corpus import prepare_corpus
from build_llm.data.markov import ABC, abc_text, entropy_rate, next_char_distribution, optimal_loss, optimal_loss_on_text
from build_llm.inspect.intermediates import format_mask, inspect_model, return_intermediates
from build_llm.inspect.surprisal import surprisal_html, surprisal_report
from build_llm.sizing import count_parameters, format_parameter_table
from build_llm.train.pretrain import train
from build_llm.train.config import ABC_TRAIN

STEPS = int(os.environ.get("ABC_STEPS", 800))
WORDS = int(os.environ.get("ABC_WORDS", 150_000))
NEW_TOKENS = int(os.environ.get("ABC_NEW_TOKENS", 700))
OUT = Path(os.environ.get("ABC_OUT", "runs/abc-markov-example"))

# %% [markdown]
# ## What the forward pass builds: positions and the causal mask
# A small model (block 8, embedding 16, 2 layers, 32 tokens, 2 heads), run on the ids 1..8. The
# mask has 1 where a position may not look (the future): this is what makes the output at
# position t a function of X_1..X_t only, an estimate of P(X_{t+1} | X_1..X_t).

# %%
set_seed(1)
small = GPTModel(GPTConfig.from_preset("r-abc", context_length=8, emb_dim=16, vocab_size=32, padding_idx=0))
res = return_intermediates(small, torch.arange(1, 9)[None, :])
print(format_mask([str(i) for i in range(1, 9)], res["mask"]))

# %% [markdown]
# ## The training text and its vocabulary

# %%
text = abc_text(WORDS, seed=1)  # the notebook's M = 150000 words (a different draw: R's RNG differs)
print(f"{len(text):,} characters; the first 60: {text[:60]!r}")
tokenizer = CharTokenizer.from_text(text)
print(tokenizer.vocab)  # ['<PAD>', '\n', 'A', 'B', 'C'], as the notebook's voc
nvoc = tokenizer.vocab_size
print(nvoc)

# %%
file0 = "ABA C\nC".replace(" ", "")
enc = tokenizer.encode(file0)
print(enc)  # the notebook's 3 4 3 5 2 5, counted from 0 instead of 1
print(repr(tokenizer.decode(enc)), tokenizer.decode(enc) == file0)

# %% [markdown]
# ## The model: preset `r-abc` (block 16, embedding 128, 2 layers, 2 heads, dropout 0.2)

# %%
cfg = GPTConfig.from_preset("r-abc")
model = GPTModel(cfg)
print(format_parameter_table(model))
print(f"Total parameters: {count_parameters(model):,}")

# %% [markdown]
# ## Sanity check: the softmax over the next character sums to 1, and an untrained model's loss
# is near ln(5), a uniform guess.

# %%
x = torch.randint(1, nvoc, (1, 8))
p = torch.softmax(model(x), dim=-1)
print(p.sum(dim=-1))
y = torch.tensor([tokenizer.encode(text[:17])])
loss = torch.nn.functional.cross_entropy(model.eval()(y[:, :-1])[0], y[0, 1:])
print(f"untrained loss {loss.item():.3f} nats; ln(5) = {math.log(5):.3f}")

# %% [markdown]
# ## Training with the package: 80/20 split, random windows, AdamW at lr 0.003
# `build_llm.train.pretrain.train` is what `build-llm train` runs. It logs to stderr, writes
# metrics.jsonl, loss.png and checkpoint/ in OUT, and knows the exact optimum.

# %%
optimum = optimal_loss(ABC, cfg.context_length)
corpus, tok = prepare_corpus(None, "char", OUT / "data", val_ratio=0.2, abc_words=WORDS, abc_seed=1)
result = train(OUT, cfg, ABC_TRAIN.replace(steps=STEPS, eval_every=max(1, STEPS // 4), device="cpu"), corpus, tok,
               optimal_loss=optimum, sample_prompt="A")
model = result.model.eval()
for row in result.history:
    print(f"step {row['step']:>4}: train {row['train_loss']:.4f}  val {row['val_loss']:.4f}  optimum {optimum:.4f}")

# %% [markdown]
# ## Predicting the next character
# After "A" the model's softmax, beside the exact probabilities of the source given that one
# character (the window may start anywhere, so "A" alone is ambiguous).

# %%
prompt = "A"
probs = torch.softmax(model(text_to_token_ids(prompt, tok))[0, -1], dim=-1)
exact = next_char_distribution(ABC, prompt)
for i, ch in enumerate(tok.vocab):
    print(f"{ch!r:>8}  model {probs[i].item():.4f}  exact {exact.get(ch, 0.0):.4f}")
print("most likely next:", repr(tok.decode([int(probs.argmax())])))

# %% [markdown]
# ## Generating text: greedy (the argmax every time), then top-k 2 sampling
# Greedy decoding falls into a loop; sampling among the two most likely characters does not.

# %%
idx = text_to_token_ids("A", tok)
greedy = generate(model, idx, NEW_TOKENS, context_size=cfg.context_length)
print(token_ids_to_text(greedy, tok)[:300])
sampled = generate(model, idx, NEW_TOKENS, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(1))
print(token_ids_to_text(sampled, tok)[:300])

# %% [markdown]
# ## The gap to the optimum, position by position
# On the validation windows, the model's loss at each window position against the exact
# Bayes-optimal loss on the very same windows. Early positions have little context, so even the
# optimum is high there; the gap is what the model has still to learn.

# %%
T = cfg.context_length
val_text = tok.decode(np.asarray(corpus.val).tolist())
starts = np.arange(0, len(val_text) - T, T)[:2000]
ids = torch.tensor([tok.encode(val_text[s:s + T + 1]) for s in starts])  # (N, T + 1)
with torch.no_grad():
    logits = model(ids[:, :-1])  # (N, T, V)
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (N, T)
model_by_position = per_token.mean(0).numpy()
optimal_by_position = optimal_loss_on_text(ABC, val_text, T)[: len(starts)].mean(0)
print(f"{'t':>3}  {'model':>7}  {'optimum':>7}  {'gap':>7}   (nats; t = characters of context)")
for t in range(T):
    print(f"{t + 1:>3}  {model_by_position[t]:7.4f}  {optimal_by_position[t]:7.4f}  "
          f"{model_by_position[t] - optimal_by_position[t]:+7.4f}")
print(f"mean: model {model_by_position.mean():.4f}, optimum {optimal_by_position.mean():.4f}; "
      f"entropy rate {entropy_rate(ABC):.4f} nats/char")

# %% [markdown]
# ## Pictures: attention, next-token bars, layers, and surprisal
# The same files `build-llm inspect` and `build-llm surprisal` write; open them from OUT.

# %%
report = inspect_model(model, tok, "CAAACB\n\nAABCBBC", OUT / "inspect", title="r-abc trained")
print(report["text"].split("\n\n")[2])  # the next-token table, with the true probabilities
sample = abc_text(60, seed=7)
surprisal = surprisal_report(model, tok, sample, source=ABC)
(OUT / "surprisal.html").write_text(surprisal_html(surprisal, title="Surprisal of ABC text"), encoding="utf-8")
print(f"bits per character {surprisal['bits_per_char']:.4f}; optimum {surprisal['optimal_bits_per_token']:.4f}")
for path in [*report["files"].values(), OUT / "surprisal.html", OUT / "loss.png"]:
    print("wrote", path)
