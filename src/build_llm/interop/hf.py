"""Hugging Face GPT-2 and the Llama family <-> GPTModel, both ways, with no network.

Import reads a local Hugging Face GPT-2 directory (`config.json` plus `model.safetensors`, a sharded
`model.safetensors.index.json`, or a legacy `pytorch_model.bin` read with `weights_only=True`) or a
`transformers` model object; export writes a directory that `GPT2LMHeadModel.from_pretrained` loads.
Reading and writing a directory needs only `safetensors`; `transformers` is needed only to hand a
model object across (`from_hf(obj)`, `to_hf`).

The two models compute the same function; only names and layouts differ:

    Hugging Face (transformer.)      GPTModel                      layout
    wte, wpe                         tok_emb, pos_emb              same
    h.i.ln_1, h.i.ln_2, ln_f         norm1, norm2, final_norm      weight -> scale, bias -> shift
    h.i.attn.c_attn                  att.W_qkv                     Conv1D (in, out) -> Linear (out, in)
    h.i.attn.c_proj                  att.out_proj                  transposed
    h.i.mlp.c_fc, h.i.mlp.c_proj     ff.layers.0, ff.layers.2      transposed
    lm_head (tied to wte unless      out_head
      tie_word_embeddings is false)

A model with rotary positions, RMSNorm or a gated feed-forward is one of the Llama family instead
(llama, mistral, qwen2, qwen3, qwen3_moe, gemma3_text; interop/hf_decoders.py): imported from any of them, and
exported as the first whose config holds every option it has. Any other mix of options, or a config
setting GPTModel does not compute, is refused with the option or key named.

GPT-2 has three dropout rates (embeddings, attention weights, residual branches); GPTModel has one,
`drop_rate`, used in all three places. Import takes the largest of the three (they are equal in
every OpenAI checkpoint); export writes `drop_rate` into all three. Dropout only acts in training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from build_llm.config import GPTConfig
from build_llm.data.special_tokens import TokenizerConfig, write_tokenizer_config
from build_llm.data.tokenizer import BPETokenizer, GPT2Tokenizer, gpt2_data_dir
from build_llm.errors import UsageError, UsageTypeError
from build_llm.gpt import GPTModel
from build_llm.interop.hf_decoders import (DECODERS, check_keys, decoder_config, decoder_hf_config, decoder_names,
                                          expert_slice, family_of, stack_experts, unstack_experts)
from build_llm.store.checkpoint import unwrap, write_failed
from build_llm.store.fsio import check_writable_dir, read_json, replace_dir

CONFIG_FILE = "config.json"
SAFETENSORS_FILE, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"

# activation_function -> our `gelu`. gelu_new, gelu_fast and gelu_pytorch_tanh are three spellings
# of the same tanh approximation (they differ by float rounding only).
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh",
               "gelu": "exact", "gelu_python": "exact"}

# Config switches GPTModel has no counterpart for, with the value a plain GPT-2 has.
# (reorder_and_upcast_attn is not here: it computes the same function, in float32, in another order.)
UNSUPPORTED = {"add_cross_attention": False, "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True}

# GPTConfig fields that do not change what the forward pass computes in eval mode: GPT-2 can hold a
# model whatever their value (padding_idx and init_std only shape initialisation and, for the pad
# row, its gradient; attn_out_dropout only acts in training; attn_impl is the same function).
# Every other field is written into the Hugging Face config or its weights below, so a field added to
# GPTConfig later is refused on export until this module learns how to express it.
EXPRESSIBLE = {"vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias",
               "tie_weights", "bias", "gelu", "fused_qkv", "padding_idx", "attn_out_dropout", "attn_impl",
               "init_std", "ln_eps"}

# The causal-mask buffers that old GPT-2 files carry next to the weights (not parameters).
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
ROTARY_BUFFER = re.compile(r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\..*")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def config_from_hf(hf: Mapping[str, Any], *, drop_rate: float | None = None) -> GPTConfig:
    """The GPTConfig of a Hugging Face `config.json` dict (GPT-2 or the Llama family); features we lack
    raise ValueError naming the key."""
    if not isinstance(hf, Mapping):
        raise UsageTypeError(f"config: expected a dict (config.json), got {type(hf).__name__}")
    model_type = hf.get("model_type", "gpt2")
    if model_type in DECODERS:
        return decoder_config(hf, model_type, drop_rate)
    if model_type != "gpt2":
        raise UsageError(f"config.json: model_type={model_type!r} is not supported; valid model types are gpt2, "
                         f"{', '.join(DECODERS)}")
    check_keys(hf, ("n_embd", "n_head", "n_layer", "n_positions", "vocab_size"), UNSUPPORTED, "GPT-2")
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * hf["n_embd"]:
        raise UsageError(f"config.json: n_inner={n_inner!r} is not supported; GPTModel's feed-forward width is "
                         f"4 * n_embd = {4 * hf['n_embd']} (or n_inner null)")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise UsageError(f"config.json: activation_function={activation!r} is not supported; valid values are "
                         f"{sorted(ACTIVATIONS)}")
    try:
        if drop_rate is None:
            drop_rate = max(float(hf.get(k, 0.1)) for k in ("embd_pdrop", "attn_pdrop", "resid_pdrop"))
        return GPTConfig(
            vocab_size=hf["vocab_size"], context_length=hf["n_positions"], emb_dim=hf["n_embd"],
            n_heads=hf["n_head"], n_layers=hf["n_layer"], drop_rate=drop_rate, qkv_bias=True,
            tie_weights=hf.get("tie_word_embeddings", True), bias=True, gelu=ACTIVATIONS[activation],
            fused_qkv=True, init_std=float(hf.get("initializer_range", 0.02)), attn_impl="sdpa",
            ln_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
    except (TypeError, ValueError) as e:
        raise UsageError(f"config.json: not a valid GPT-2 config: {e}") from e


def hf_architecture(cfg: GPTConfig) -> str:
    """"gpt2" or a Llama-family model_type: the Hugging Face architecture that can hold `cfg`, or
    UsageError naming the options none can express. Rotary positions, RMSNorm or a gated
    feed-forward make it one of the Llama family."""
    if cfg.pos_emb != "rope" and cfg.norm != "rmsnorm" and cfg.mlp not in ("swiglu", "geglu"):
        return "gpt2" if not _not_gpt2(cfg) else _refuse("GPT-2", _not_gpt2(cfg))
    return family_of(cfg)


def _not_gpt2(cfg: GPTConfig) -> dict[str, Any]:
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    return {k: v for k, v in cfg.to_dict().items() if k not in EXPRESSIBLE and v != defaults.get(k)}


def _refuse(arch: str, extra: Mapping[str, Any], needs: str = "") -> str:
    raise UsageError(f"{arch} cannot express this model: {', '.join(f'{k}={v!r}' for k, v in extra.items())} "
                     f"has no counterpart in a Hugging Face {arch} config{needs}")


def config_to_hf(cfg: GPTConfig, *, eos_id: int | None = None) -> dict[str, Any]:
    """A Hugging Face `config.json` dict for `cfg` (GPT-2, or the Llama-family type that holds it);
    features none has raise UsageError."""
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        eos_id = None
    family = hf_architecture(cfg)
    if family != "gpt2":
        return decoder_hf_config(cfg, family, eos_id)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": None,
        "activation_function": "gelu_new" if cfg.gelu == "tanh" else "gelu",
        "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
        "layer_norm_epsilon": cfg.ln_eps, "initializer_range": cfg.init_std or 0.02,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "tie_word_embeddings": cfg.tie_weights, "use_cache": True,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------------------------------
# Weight names
# --------------------------------------------------------------------------------------------------


def name_map(cfg: GPTConfig) -> dict[str, tuple[str, bool]]:
    """Hugging Face name (no `transformer.` prefix) -> (our name, transposed) for an imported model."""
    names = {"wte.weight": ("tok_emb.weight", False), "wpe.weight": ("pos_emb.weight", False),
             "ln_f.weight": ("final_norm.scale", False), "ln_f.bias": ("final_norm.shift", False)}
    for i in range(cfg.n_layers):
        ours = f"trf_blocks.{i}"
        for hf_ln, our_ln in (("ln_1", "norm1"), ("ln_2", "norm2")):
            names[f"h.{i}.{hf_ln}.weight"] = (f"{ours}.{our_ln}.scale", False)
            names[f"h.{i}.{hf_ln}.bias"] = (f"{ours}.{our_ln}.shift", False)
        for hf_lin, our_lin in (("attn.c_attn", "att.W_qkv"), ("attn.c_proj", "att.out_proj"),
                                ("mlp.c_fc", "ff.layers.0"), ("mlp.c_proj", "ff.layers.2")):
            names[f"h.{i}.{hf_lin}.weight"] = (f"{ours}.{our_lin}.weight", True)
            names[f"h.{i}.{hf_lin}.bias"] = (f"{ours}.{our_lin}.bias", False)
    if not cfg.tie_weights:
        names["lm_head.weight"] = ("out_head.weight", False)
    return names


def _hf_name(key: str) -> str:
    return key[len("transformer."):] if key.startswith("transformer.") else key


# --------------------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------------------


def _open_directory(directory: Path, stack: ExitStack) -> tuple[dict[str, Any], dict[str, Callable[[], torch.Tensor]]]:
    """config.json as a dict, and a loader per tensor name that reads that one tensor when called."""
    if not directory.exists():
        raise UsageError(f"{str(directory)!r} does not exist; give a local Hugging Face GPT-2 directory")
    if not directory.is_dir():
        raise UsageError(f"{str(directory)!r} is not a directory; give a local Hugging Face GPT-2 directory")
    if not (directory / CONFIG_FILE).is_file():
        raise UsageError(f"{str(directory)!r} has no {CONFIG_FILE}; a Hugging Face GPT-2 directory holds "
                         f"{CONFIG_FILE} plus {SAFETENSORS_FILE} or {TORCH_FILE}")
    config = read_json(directory / CONFIG_FILE)

    if (directory / SAFETENSORS_FILE).is_file():
        return config, _safetensors_loaders([directory / SAFETENSORS_FILE], stack)
    if (directory / SAFETENSORS_INDEX).is_file():  # sharded: the index maps tensor names to files
        try:
            weight_map = read_json(directory / SAFETENSORS_INDEX)["weight_map"]
            shards = sorted({directory / name for name in weight_map.values()})
        except (KeyError, TypeError, AttributeError) as e:
            raise UsageError(f"{str(directory / SAFETENSORS_INDEX)!r} is not a valid shard index ({e})") from e
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise UsageError(f"{str(directory)!r}: shard(s) {missing[:3]} listed in {SAFETENSORS_INDEX} are missing")
        return config, _safetensors_loaders(shards, stack)
    if (directory / TORCH_FILE).is_file():
        return config, _torch_loaders(directory / TORCH_FILE)
    raise UsageError(f"{str(directory)!r} has {CONFIG_FILE} but no weights: expected {SAFETENSORS_FILE}, "
                     f"{SAFETENSORS_INDEX} or {TORCH_FILE}")


def _safetensors_loaders(paths: list[Path], stack: ExitStack) -> dict[str, Callable[[], torch.Tensor]]:
    loaders: dict[str, Callable[[], torch.Tensor]] = {}
    for path in paths:
        try:
            handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
        except (SafetensorError, OSError, ValueError) as e:
            raise UsageError(f"{str(path)!r} is unreadable or truncated ({e})") from e

        def load(key: str, handle=handle, path=path) -> torch.Tensor:
            try:
                return handle.get_tensor(key)
            except (SafetensorError, OSError, ValueError) as e:
                raise UsageError(f"{str(path)!r}: tensor {key!r} is unreadable ({e})") from e

        for key in handle.keys():
            loaders[key] = lambda key=key, load=load: load(key)
    return loaders


def _torch_loaders(path: Path) -> dict[str, Callable[[], torch.Tensor]]:
    # weights_only=True: tensors and plain containers only, no arbitrary code from the file.
    # mmap keeps the tensors on disk until each is copied (needs the zip format of torch >= 1.6).
    state = None
    for mmap in (True, False):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
            error = e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        detail = f"({type(error).__name__}: {error})" if state is None else "(not a dict of tensors)"
        raise UsageError(f"{str(path)!r} is not a readable PyTorch state dict {detail}")
    return {key: (lambda t=t: t) for key, t in state.items()}


def _fresh_model(cfg: GPTConfig) -> GPTModel:
    """A GPTModel with allocated but unset weights (no random initialisation to pay for)."""
    with torch.device("meta"):
        model = GPTModel(cfg)
    model = model.to_empty(device="cpu")
    if cfg.tie_weights:
        model.out_head.weight = model.tok_emb.weight
    return model


def weight_names(cfg: GPTConfig, family: str) -> dict[str, tuple[str, bool]]:
    """Hugging Face name (GPT-2's without `transformer.`) -> (our name, transposed) for `family`."""
    if family == "gpt2":
        return name_map(cfg)
    return {hf: (ours, False) for hf, ours in decoder_names(cfg, family).items()}


def _ignored(name: str, cfg: GPTConfig) -> bool:
    """Tensors a file may hold that are not weights: causal-mask and rotary buffers, and the tied
    head's copy of the token embedding."""
    return bool(MASK_BUFFER.fullmatch(name) or ROTARY_BUFFER.fullmatch(name)
                or (name == "lm_head.weight" and cfg.tie_weights))


def _fill(model: GPTModel, loaders: Mapping[str, Callable[[], torch.Tensor]], source: str, family: str) -> GPTModel:
    names = weight_names(model.cfg, family)
    by_hf = {}
    unexpected = []
    for key in loaders:
        name = _hf_name(key) if family == "gpt2" else key
        if name in names:
            by_hf[name] = key
        elif not _ignored(name, model.cfg):
            unexpected.append(key)
    missing = sorted(set(names) - set(by_hf))
    if missing or unexpected:
        raise UsageError(f"{source}: the weights do not match a {family} of this config (missing {missing[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]})")
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, key in by_hf.items():  # one tensor in memory at a time, beside the model
            ours, transposed = names[name]
            target = expert_slice(params, ours)
            expected = tuple(target.shape[::-1] if transposed else target.shape)
            tensor = loaders[key]()
            if tuple(tensor.shape) != expected:
                raise UsageError(f"{source}: {key} has shape {tuple(tensor.shape)}, but config.json implies {expected}")
            target.copy_(tensor.t() if transposed else tensor)  # Conv1D (in, out) -> Linear (out, in); any dtype
            del tensor
    return model


def from_hf(model_or_dir: Any, *, drop_rate: float | None = None) -> GPTModel:
    """A GPTModel (eval mode, float32) with the weights of a Hugging Face GPT-2, Llama, Mistral, Qwen2,
    Qwen3, Qwen3-MoE or Gemma 3 (text) model.

    `model_or_dir` is a local directory (config.json plus model.safetensors, a sharded
    model.safetensors.index.json, or pytorch_model.bin; float32 or bfloat16) or a `transformers` model
    of one of those types. Tensors are copied one at a time into an uninitialised model, so the
    import needs about the model's own memory. `drop_rate` overrides the config's dropout.
    """
    if isinstance(model_or_dir, (str, os.PathLike)):
        directory = Path(model_or_dir)
        with ExitStack() as stack:
            config, loaders = _open_directory(directory, stack)
            cfg = config_from_hf(config, drop_rate=drop_rate)
            return _fill(_fresh_model(cfg), loaders, str(directory), config.get("model_type", "gpt2")).eval()
    config = getattr(model_or_dir, "config", None)
    if not isinstance(model_or_dir, nn.Module) or not hasattr(config, "to_dict"):
        raise TypeError("model_or_dir: expected a directory path or a transformers GPT-2 model (or Llama, Mistral, "
                        f"Qwen2, Qwen3, Qwen3-MoE, Gemma 3), got {type(model_or_dir).__name__}")
    config = config.to_dict()
    cfg = config_from_hf(config, drop_rate=drop_rate)
    state = model_or_dir.state_dict()
    loaders = unstack_experts({key: (lambda t=t: t.detach()) for key, t in state.items()})
    return _fill(_fresh_model(cfg), loaders, type(model_or_dir).__name__, config.get("model_type", "gpt2")).eval()


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def hf_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) of every weight of `model`: GPT-2's names in Conv1D layout, or the
    Llama family's (decoder_tensors) for a model with their options.

    Missing pieces that GPT-2 always has are written as the zeros that make them do nothing: QKV
    biases, and all biases and LayerNorm shifts of a `bias=False` model. Separate Q, K and V
    projections are stacked into c_attn in GPT-2's (query, key, value) order.
    """
    model = unwrap(model)
    if not isinstance(model, GPTModel):
        raise TypeError(f"model: expected a GPTModel, got {type(model).__name__}")
    cfg = model.cfg
    family = hf_architecture(cfg)
    if family != "gpt2":
        yield from decoder_tensors(model, family)
        return

    def shift(norm: nn.Module) -> torch.Tensor:
        return norm.shift if norm.shift is not None else torch.zeros_like(norm.scale)

    def bias(linear: nn.Linear) -> torch.Tensor:
        return linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.weight.shape[0])

    yield "transformer.wte.weight", model.tok_emb.weight
    yield "transformer.wpe.weight", model.pos_emb.weight
    for i, block in enumerate(model.trf_blocks):
        p = f"transformer.h.{i}."
        att = block.att
        if att.fused_qkv:
            qkv_weight, qkv_bias = att.W_qkv.weight, bias(att.W_qkv)
        else:
            parts = (att.W_query, att.W_key, att.W_value)
            qkv_weight = torch.cat([w.weight for w in parts], dim=0)  # (3C, C)
            qkv_bias = torch.cat([bias(w) for w in parts], dim=0)  # (3C,)
        yield p + "ln_1.weight", block.norm1.scale
        yield p + "ln_1.bias", shift(block.norm1)
        yield p + "attn.c_attn.weight", qkv_weight.t()  # (C, 3C)
        yield p + "attn.c_attn.bias", qkv_bias
        yield p + "attn.c_proj.weight", att.out_proj.weight.t()
        yield p + "attn.c_proj.bias", bias(att.out_proj)
        yield p + "ln_2.weight", block.norm2.scale
        yield p + "ln_2.bias", shift(block.norm2)
        yield p + "mlp.c_fc.weight", block.ff.layers[0].weight.t()  # (C, 4C)
        yield p + "mlp.c_fc.bias", bias(block.ff.layers[0])
        yield p + "mlp.c_proj.weight", block.ff.layers[2].weight.t()  # (4C, C)
        yield p + "mlp.c_proj.bias", bias(block.ff.layers[2])
    yield "transformer.ln_f.weight", model.final_norm.scale
    yield "transformer.ln_f.bias", shift(model.final_norm)
    if not cfg.tie_weights:
        yield "lm_head.weight", model.out_head.weight


def decoder_tensors(model: GPTModel, family: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) of every weight of a Llama-family GPTModel (Linear layout); a fused
    W_qkv is split into the q, k and v projections."""
    ours = dict(model.named_parameters(remove_duplicate=False))
    for i, block in enumerate(model.trf_blocks):
        att = block.att
        if att.fused_qkv:
            kv_out = att.num_kv_heads * att.head_dim
            for part in ("weight", "bias"):
                fused = getattr(att.W_qkv, part)
                if fused is not None:
                    q, k, v = fused.split([att.d_out, kv_out, kv_out], dim=0)  # (nh*hs, ...), (n_kv*hs, ...) x 2
                    for name, t in (("W_query", q), ("W_key", k), ("W_value", v)):
                        ours[f"trf_blocks.{i}.att.{name}.{part}"] = t
    for hf_name, our_name in decoder_names(model.cfg, family).items():
        yield hf_name, expert_slice(ours, our_name)


def to_hf(model: nn.Module) -> Any:
    """A `transformers` model (GPT2LMHeadModel, or the Llama-family class that holds `model`'s options),
    eval mode, that computes the same logits as `model`."""
    try:  # transformers is optional: only to_hf needs it
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        raise ImportError("to_hf needs the optional package 'transformers' (pip install transformers); "
                          "save_hf writes a loadable directory without it") from e
    # Copies, so that the two models do not share (and later silently co-train) their weights.
    state = {name: t.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format)
             for name, t in hf_tensors(model)}  # hf_tensors checks the type
    model = unwrap(model)
    hf_config = config_to_hf(model.cfg)
    hf_config.pop("architectures")
    hf_config.pop("torch_dtype")
    config = AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    with torch.device("meta"):  # no memory and no random initialisation for weights about to be replaced
        hf = AutoModelForCausalLM.from_config(config)
    if any(b.is_meta for b in hf.buffers()):  # causal-mask or rotary buffers: build the model for real
        hf = AutoModelForCausalLM.from_config(config)
    if model.cfg.tie_weights:
        state["lm_head.weight"] = state["transformer.wte.weight" if "transformer.wte.weight" in state
                                        else "model.embed_tokens.weight"]
    state = stack_experts(state, hf.state_dict())  # transformers 5 holds the experts stacked
    hf.load_state_dict(state, strict=False, assign=True)
    hf.tie_weights()
    still_meta = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if still_meta:
        raise RuntimeError(f"to_hf: this transformers version expects weights we did not provide: {still_meta[:4]}")
    return hf.eval()


HF_KIND = "hf-export"  # the kind in the ownership marker of a directory save_hf writes


def save_hf(model: nn.Module, out_dir: str | os.PathLike[str], tokenizer: Any = None,
            chat_template: str | None = None) -> list[str]:
    """Write `model` (and `tokenizer`, if Hugging Face can hold it) as a Hugging Face GPT-2 directory
    (a Llama-family one for a model with their options).

    The directory holds config.json and model.safetensors, which
    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads; a GPT-2 tokenizer adds vocab.json
    and merges.txt (the canonical files), a trained BPE its tokenizer.json, each with
    tokenizer_config.json for `AutoTokenizer` (an imported tokenizer's own special tokens and chat
    template, with generation_config.json for its end ids). A character tokenizer has no Hugging Face form and is
    left out. An export this package wrote at `out_dir` (holding only what it wrote) is replaced
    atomically; any other non-empty directory is refused (see fsio). Returns the names of the files written.
    """
    model = unwrap(model)
    if not isinstance(model, GPTModel):
        raise TypeError(f"model: expected a GPTModel, got {type(model).__name__}")
    out = Path(out_dir)
    check_writable_dir(out, HF_KIND, whole=True)  # before any work: only an export of ours may be replaced
    eos_id = getattr(tokenizer, "eos_id", None)
    hf_config = config_to_hf(model.cfg, eos_id=eos_id)  # raises before anything is written
    state = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in hf_tensors(model)}

    try:
        with replace_dir(out, HF_KIND) as tmp:
            save_file(state, tmp / SAFETENSORS_FILE, metadata={"format": "pt"})
            del state
            (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
            tok_config = None
            if isinstance(tokenizer, GPT2Tokenizer):
                data = gpt2_data_dir()  # the canonical files, hash-checked when the tokenizer was built
                shutil.copyfile(data / "encoder.json", tmp / "vocab.json")
                shutil.copyfile(data / "vocab.bpe", tmp / "merges.txt")
                tok_config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False}
            elif isinstance(tokenizer, BPETokenizer) and tokenizer.config != TokenizerConfig():
                tokenizer.save(tmp / "tokenizer.json")  # its own special tokens and chat template, as imported
                write_tokenizer_config(tmp, tokenizer.config, model_max_length=model.cfg.context_length)
            elif isinstance(tokenizer, BPETokenizer):
                tokenizer.save(tmp / "tokenizer.json")
                tok_config = {"tokenizer_class": "PreTrainedTokenizerFast"}
            if tok_config is not None:
                special = "<|endoftext|>" if eos_id is not None else None
                tok_config.update(bos_token=special, eos_token=special, unk_token=special,
                                  model_max_length=model.cfg.context_length)
                if chat_template is not None:  # the format a tokenizer without its own was fine-tuned in
                    tok_config["chat_template"] = chat_template
                (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
            written = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("."))
    except (OSError, SafetensorError) as e:
        raise write_failed(out, e) from e
    return written
