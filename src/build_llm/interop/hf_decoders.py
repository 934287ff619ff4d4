"""Hugging Face's Llama-family decoders <-> GPTConfig: llama, mistral, qwen2, qwen3, gemma3_text.

All five are one architecture with options, which GPTModel has too: rotary positions, RMSNorm,
a gated feed-forward, grouped-query attention, and per family

    llama        Llama 3's rope scaling, biases on attention and feed-forward (both or neither)
    mistral      a sliding window on every layer
    qwen2        q/k/v biases, none on the output projection
    qwen3        RMS-normalised queries and keys, a head size apart from hidden_size / heads
    qwen3_moe    qwen3 with a mixture of SwiGLU experts in every layer (top-k routing, optionally
                 renormalised: norm_topk_prob); the experts as Hugging Face's files hold them, one
                 gate/up/down per expert (transformers 5 stacks them in memory: read and written too)
    gemma3_text  (1 + w) RMSNorms, embeddings times sqrt(hidden_size), GELU-tanh gating, a norm
                 after each sub-layer as well, local (sliding, own rotary base) and global layers,
                 scores times query_pre_attn_scalar^-1/2

Configs are read as transformers 4.x writes them (`rope_theta`, `rope_scaling`, Gemma's
`rope_local_base_freq`, `sliding_window_pattern`) and as 5.x does (`rope_parameters`, per layer type
for Gemma 3; `layer_types`); export writes both. A setting GPTModel cannot compute is refused with
one line naming its key. Export picks the first family whose config, read back, is the model's own
(`family_of`), so what it writes is proven expressible. Weights are in Linear (out, in) layout on both
sides; our rotate-half rotary pairing is Hugging Face's, and a (1 + w) norm stores w as Gemma does.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch

from build_llm.config import GPTConfig
from build_llm.errors import UsageError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
DECODERS = tuple(ARCHITECTURES)
# transformers' defaults where a published config may leave a key out.
CONTEXT = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768, "qwen3_moe": 32768, "gemma3_text": 131072}
ACTIVATIONS = {"silu": ("swiglu", "tanh"), "gelu_pytorch_tanh": ("geglu", "tanh"), "gelu_new": ("geglu", "tanh"),
               "gelu_fast": ("geglu", "tanh"), "gelu": ("geglu", "exact")}
# Keys whose other values change the function in a way GPTModel does not compute: key -> the plain value.
PLAIN = {"attn_logit_softcapping": None, "final_logit_softcapping": None, "use_bidirectional_attention": False,
         "partial_rotary_factor": 1.0}


def _refuse(key: str, value: Any, valid: str) -> UsageError:
    return UsageError(f"config.json: {key}={value!r} is not supported; {valid}")


def check_keys(hf: Mapping[str, Any], required: tuple[str, ...], plain: Mapping[str, Any], what: str) -> None:
    """Refuse in one line naming the key (GPT-2's reader and the Llama family's): a `config.json` without
    one of `required`, or with a key of `plain` set otherwise than the value GPTModel computes."""
    for key in required:
        if key not in hf:
            raise UsageError(f"config.json: {key!r} is missing; a {what} config needs {', '.join(required)}")
    for key, value in plain.items():
        if hf.get(key, value) != value:
            raise _refuse(key, hf[key], f"GPTModel implements only {key}={value!r}")


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _rope_fields(p: Mapping[str, Any], key: str) -> dict[str, Any]:
    """GPTConfig's rotary fields from one rope parameter dict (5.x `rope_parameters`, or 4.x
    `rope_scaling` with `rope_theta` added)."""
    kind = p.get("rope_type", p.get("type", "default"))
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(f"{key}.partial_rotary_factor", p["partial_rotary_factor"], "GPTModel rotates every channel (1.0)")
    if kind not in ("default", "linear", "llama3"):
        raise _refuse(f"{key}.rope_type", kind, "valid rope types are default, linear and llama3")
    required = {"default": (), "linear": ("factor",), "llama3": ("factor", "original_max_position_embeddings")}
    for name in required[kind]:
        if not isinstance(p.get(name), (int, float)) or isinstance(p.get(name), bool):
            raise UsageError(f"config.json: {key}.{name} is {p.get(name)!r}; {kind} rotary scaling needs it as a "
                             "number (transformers' own config check requires it too)")
    fields: dict[str, Any] = {"rope_base": float(p["rope_theta"])}
    if kind == "default":
        return fields
    if kind == "linear":
        return {**fields, "rope_scaling": "linear", "rope_factor": float(p["factor"])}
    return {**fields, "rope_scaling": "llama3", "rope_factor": float(p["factor"]),
            "rope_low_freq_factor": float(p.get("low_freq_factor", 1.0)),
            "rope_high_freq_factor": float(p.get("high_freq_factor", 4.0)),
            "rope_original_context": int(p["original_max_position_embeddings"])}


def _rope(hf: Mapping[str, Any], family: str) -> dict[str, Any]:
    params = hf.get("rope_parameters")
    if family != "gemma3_text":
        if isinstance(params, Mapping) and "rope_theta" in params:
            return _rope_fields(params, "rope_parameters")
        return _rope_fields({**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 10000.0)},
                            "rope_scaling")
    if isinstance(params, Mapping) and "full_attention" in params:
        full, local = params["full_attention"], params.get("sliding_attention") or {}
    else:
        full = {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 1_000_000.0)}
        local = {"rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    local_fields = _rope_fields({"rope_theta": 10_000.0, **local}, "rope_parameters.sliding_attention")
    if len(local_fields) > 1:
        raise _refuse("rope_parameters.sliding_attention.rope_type", local.get("rope_type"),
                      "Gemma 3's local layers take plain rotary positions (default)")
    return {**_rope_fields({"rope_theta": 1_000_000.0, **full}, "rope_parameters.full_attention"),
            "rope_local_base": local_fields["rope_base"]}


def _layers(hf: Mapping[str, Any], family: str, n_layers: int) -> dict[str, Any]:
    """sliding_window and layer_types: None and None when every layer attends to the whole context."""
    if family == "llama":
        return {}
    # a key left out means transformers' default for it (4096 tokens, the first 28 layers full); its
    # Qwen3-MoE has no max_window_layers: a window there is on every layer
    if family == "mistral":
        return {"sliding_window": hf.get("sliding_window", 4096)}
    if family in ("qwen2", "qwen3", "qwen3_moe"):
        window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window") else None
        first = 0 if family == "qwen3_moe" else hf.get("max_window_layers", 28)
        default = ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(n_layers)]
    else:
        window = hf.get("sliding_window", 4096)
        every = hf.get("sliding_window_pattern", 6)
        default = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layers)]
    given = hf.get("layer_types") or default
    kinds = {"full_attention": "full", "sliding_attention": "sliding"}
    if any(t not in kinds for t in given) or len(given) != n_layers:
        raise _refuse("layer_types", given, f"expected {n_layers} of full_attention / sliding_attention")
    types = tuple(kinds[t] for t in given)
    if window is None or "sliding" not in types:
        return {}
    return {"sliding_window": window, "layer_types": None if "full" not in types else types}


def _biases(hf: Mapping[str, Any], family: str) -> dict[str, bool]:
    if family == "qwen2":
        return {"qkv_bias": True, "bias": False}
    attention, mlp = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if family == "llama" and attention != mlp:
        raise _refuse("attention_bias", attention, f"with mlp_bias={mlp} GPTModel needs both or neither")
    if family != "llama" and (attention or mlp):
        raise _refuse("attention_bias" if attention else "mlp_bias", True, f"a {family} has no biases")
    return {"qkv_bias": attention, "bias": attention}


def _experts(hf: Mapping[str, Any], family: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a qwen3_moe config (transformers 4 writes num_experts, 5
    num_local_experts); GPTModel puts the experts in every layer, so any dense layer is refused."""
    if family != "qwen3_moe":
        return {}
    n = hf.get("num_experts", hf.get("num_local_experts", 128))
    if not n:
        return {}
    if hf.get("decoder_sparse_step", 1) != 1:
        raise _refuse("decoder_sparse_step", hf["decoder_sparse_step"], "GPTModel has experts in every layer (1)")
    if hf.get("mlp_only_layers"):
        raise _refuse("mlp_only_layers", hf["mlp_only_layers"], "GPTModel has experts in every layer ([])")
    return {"n_experts": n, "n_experts_per_token": hf.get("num_experts_per_tok", 8),
            "moe_ff_dim": hf.get("moe_intermediate_size", 768), "moe_norm_topk": bool(hf.get("norm_topk_prob", False))}


def decoder_config(hf: Mapping[str, Any], family: str, drop_rate: float | None = None) -> GPTConfig:
    """The GPTConfig of a Llama-family `config.json` dict; anything GPTModel cannot compute raises
    UsageError naming its key."""
    check_keys(hf, ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"),
               PLAIN, family)
    gemma = family == "gemma3_text"
    act_key = "hidden_activation" if gemma and "hidden_activation" in hf else "hidden_act"
    act = hf.get(act_key, "gelu_pytorch_tanh" if gemma else "silu")
    if act not in ACTIVATIONS:
        raise _refuse(act_key, act, f"valid activations are {sorted(ACTIVATIONS)}")
    emb, heads, n_layers = hf["hidden_size"], hf["num_attention_heads"], hf["num_hidden_layers"]
    head_dim = hf.get("head_dim") or {"qwen3": 128, "gemma3_text": 256}.get(family, emb // heads)
    kv_heads = hf.get("num_key_value_heads") or heads
    scalar = hf.get("query_pre_attn_scalar", 256) if gemma else head_dim
    try:
        options = {**_biases(hf, family), **_rope(hf, family), **_layers(hf, family, n_layers), **_experts(hf, family)}
        return GPTConfig(
            vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", CONTEXT[family]),
            emb_dim=emb, n_heads=heads, n_layers=n_layers,
            drop_rate=float(hf.get("attention_dropout") or 0.0) if drop_rate is None else drop_rate,
            tie_weights=bool(hf.get("tie_word_embeddings", gemma)), attn_impl="sdpa",
            init_std=float(hf.get("initializer_range", 0.02)), ln_eps=float(hf.get("rms_norm_eps", 1e-6)),
            pos_emb="rope", norm="rmsnorm", mlp=ACTIVATIONS[act][0], gelu=ACTIVATIONS[act][1],
            ff_dim=hf["intermediate_size"], qk_norm=family in ("qwen3", "qwen3_moe", "gemma3_text"),
            n_kv_heads=kv_heads if kv_heads != heads else None,
            head_size=head_dim if head_dim * heads != emb else None,
            attn_scale=None if scalar == head_dim else float(scalar) ** -0.5,
            norm_plus_one=gemma, scale_emb=gemma, post_norms=gemma,
            **options,
        )
    except UsageError:  # a refusal that names its key already
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise UsageError(f"config.json: not a valid {family} config for GPTModel: {e}") from e


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _rope_params(cfg: GPTConfig, local: bool = False) -> dict[str, Any]:
    if local:
        return {"rope_type": "default", "rope_theta": cfg.rope_local_base or cfg.rope_base}
    p: dict[str, Any] = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling,
                         "rope_theta": cfg.rope_base}
    if cfg.rope_scaling != "none":
        p["factor"] = cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        p.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                 original_max_position_embeddings=cfg.rope_original_context)
    return p


def _number(x: float) -> int | float:
    """An integer where x is one (transformers types query_pre_attn_scalar as int)."""
    return round(x) if abs(x - round(x)) < 1e-9 * max(1.0, abs(x)) else x


def decoder_hf_config(cfg: GPTConfig, family: str, eos_id: int | None = None) -> dict[str, Any]:
    """A `config.json` dict of `family` for `cfg`, with transformers 4.x and 5.x rope keys (the 4.x
    reader ignores `rope_parameters`, the 5.x one takes it first). Says what `family` can say of
    cfg; `family_of` checks that this is all of it."""
    rope = _rope_params(cfg)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if cfg.rope_scaling != "none" else None
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]], "model_type": family,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.emb_dim, "intermediate_size": cfg.ff_hidden,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.ln_eps,
        "rope_theta": cfg.rope_base, "rope_scaling": scaling, "rope_parameters": rope,
        "attention_dropout": cfg.drop_rate, "initializer_range": cfg.init_std or 0.02,
        "tie_word_embeddings": cfg.tie_weights, "use_cache": True, "bos_token_id": eos_id, "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
    act = "silu" if cfg.mlp == "swiglu" else "gelu_pytorch_tanh" if cfg.gelu == "tanh" else "gelu"
    hf["hidden_activation" if family == "gemma3_text" else "hidden_act"] = act
    if family == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.bias)
    elif family == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    elif family == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    elif family in ("qwen3", "qwen3_moe"):
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers, attention_bias=False)
        if family == "qwen3_moe":
            hf.update(num_experts=cfg.n_experts, num_experts_per_tok=cfg.n_experts_per_token,
                      moe_intermediate_size=cfg.expert_hidden, norm_topk_prob=cfg.moe_norm_topk,
                      decoder_sparse_step=1, mlp_only_layers=[])
    else:
        types = ["sliding_attention" if t == "sliding" else "full_attention" for t in cfg.types_of_layers]
        hf.update(sliding_window=cfg.sliding_window or cfg.context_length, layer_types=types,
                  rope_local_base_freq=cfg.rope_local_base or cfg.rope_base, attention_bias=False,
                  query_pre_attn_scalar=cfg.head_dim if cfg.attn_scale is None else _number(cfg.attn_scale ** -2),
                  rope_parameters={"full_attention": rope, "sliding_attention": _rope_params(cfg, local=True)},
                  final_logit_softcapping=None, attn_logit_softcapping=None, hidden_activation=act)
    return hf


def function_of(cfg: GPTConfig) -> dict[str, Any]:
    """The fields that decide what `cfg`'s model computes in eval mode, each in one spelling (ff_dim as
    the width, n_kv_heads as a count, every layer's type, unused rotary and window fields blank)."""
    d = cfg.to_dict()
    for key in ("drop_rate", "init_std", "attn_impl", "fused_qkv", "padding_idx", "attn_out_dropout"):
        d.pop(key)
    d.update(ff_dim=cfg.ff_hidden, head_size=cfg.head_dim, n_kv_heads=cfg.kv_heads,
             layer_types=list(cfg.types_of_layers))
    if "sliding" not in cfg.types_of_layers:
        d.update(sliding_window=None, rope_local_base=None)
    elif d["rope_local_base"] is None and cfg.rope_scaling == "none":
        d["rope_local_base"] = cfg.rope_base  # the local layers' base either way
    if cfg.rope_scaling == "none":
        d.update(rope_factor=None)
    if cfg.rope_scaling != "llama3":
        d.update(rope_low_freq_factor=None, rope_high_freq_factor=None, rope_original_context=None)
    if cfg.mlp not in ("gelu", "geglu"):
        d["gelu"] = None
    if cfg.attn_scale is not None and cfg.attn_scale == cfg.head_dim ** -0.5:
        d["attn_scale"] = None
    if cfg.n_experts:
        d["moe_ff_dim"] = cfg.expert_hidden
    else:
        d.update(n_experts_per_token=None, moe_ff_dim=None, moe_norm_topk=None)
    return d


def family_of(cfg: GPTConfig) -> str:
    """The first Llama-family model_type whose config holds all of `cfg`, or UsageError naming what the
    closest one cannot hold."""
    ours, misses = function_of(cfg), {}
    for family in DECODERS:
        try:
            back = function_of(decoder_config(decoder_hf_config(cfg, family), family, cfg.drop_rate))
        except UsageError:
            continue
        misses[family] = {k: v for k, v in ours.items() if back.get(k) != v}
        if not misses[family]:
            return family
    closest = min(misses, key=lambda f: len(misses[f]))
    said = ", ".join(f"{k}={getattr(cfg, k)!r}" for k, v in misses[closest].items() if v is not None)
    raise UsageError(f"the Hugging Face architectures (gpt2, {', '.join(DECODERS)}) cannot express this model: "
                     f"{said} has no counterpart (the closest is {closest})")


# --------------------------------------------------------------------------------------------------
# Weight names
# --------------------------------------------------------------------------------------------------


def decoder_names(cfg: GPTConfig, family: str) -> dict[str, str]:
    """Hugging Face name -> our name of every weight of a Llama-family model of `cfg`; one expert's
    matrix is named by its index into our stacked tensor (`trf_blocks.0.ff.fc1.5`, see expert_slice)."""
    gemma = family == "gemma3_text"
    names = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "final_norm.scale"}
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}.", f"trf_blocks.{i}."
        norms = {"input_layernorm": "norm1", "post_attention_layernorm": "post_norm1" if gemma else "norm2"}
        if gemma:
            norms.update(pre_feedforward_layernorm="norm2", post_feedforward_layernorm="post_norm2")
        names.update({f"{hf}{h}.weight": f"{ours}{o}.scale" for h, o in norms.items()})
        projections = {"q_proj": "W_query", "k_proj": "W_key", "v_proj": "W_value", "o_proj": "out_proj"}
        for h, o in projections.items():
            names[f"{hf}self_attn.{h}.weight"] = f"{ours}att.{o}.weight"
            if (cfg.qkv_bias and h != "o_proj") or (cfg.bias and h == "o_proj"):
                names[f"{hf}self_attn.{h}.bias"] = f"{ours}att.{o}.bias"
        if cfg.qk_norm:
            names[f"{hf}self_attn.q_norm.weight"] = f"{ours}att.q_norm.scale"
            names[f"{hf}self_attn.k_norm.weight"] = f"{ours}att.k_norm.scale"
        if cfg.n_experts:
            names[f"{hf}mlp.gate.weight"] = f"{ours}ff.gate.weight"  # the router
            for e in range(cfg.n_experts):
                for h, o in (("gate_proj", "fc1"), ("up_proj", "fc2"), ("down_proj", "fc3")):
                    names[f"{hf}mlp.experts.{e}.{h}.weight"] = f"{ours}ff.{o}.{e}"
            continue
        for h, o in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            names[f"{hf}mlp.{h}.weight"] = f"{ours}ff.{o}.weight"
            if cfg.bias:
                names[f"{hf}mlp.{h}.bias"] = f"{ours}ff.{o}.bias"
    if not cfg.tie_weights:
        names["lm_head.weight"] = "out_head.weight"
    return names


def expert_slice(params: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """Our tensor `name` from `params`: a parameter, or one expert's matrix `<stacked>.<e>` (a view)."""
    if name in params:
        return params[name]
    stacked, _, e = name.rpartition(".")
    return params[stacked][int(e)]


def unstack_experts(loaders: Mapping[str, Callable[[], torch.Tensor]]) -> dict[str, Callable[[], torch.Tensor]]:
    """`loaders` with transformers 5's in-memory experts (`mlp.experts.gate_up_proj` (E, 2H, C) and
    `mlp.experts.down_proj` (E, C, H)) under the names the files use, one gate/up/down matrix per
    expert, each sliced when read."""
    out = dict(loaders)
    for key in [k for k in loaders if k.endswith("mlp.experts.gate_up_proj")]:
        prefix = key[:-len("gate_up_proj")]
        gate_up, down = out.pop(key), out.pop(prefix + "down_proj")
        for e in range(gate_up().shape[0]):
            out[f"{prefix}{e}.gate_proj.weight"] = lambda e=e, t=gate_up: t()[e].chunk(2)[0]  # gate rows first
            out[f"{prefix}{e}.up_proj.weight"] = lambda e=e, t=gate_up: t()[e].chunk(2)[1]
            out[f"{prefix}{e}.down_proj.weight"] = lambda e=e, t=down: t()[e]
    return out


def stack_experts(state: dict[str, torch.Tensor], wanted: Iterable[str]) -> dict[str, torch.Tensor]:
    """`state` (the files' names) with the experts stacked as a transformers 5 model holds them, for the
    `wanted` names that ask for it; unchanged for transformers 4 (a module per expert)."""
    for key in [k for k in wanted if k.endswith("mlp.experts.gate_up_proj")]:
        prefix = key[:-len("gate_up_proj")]
        n = sum(1 for k in state if k.startswith(prefix) and k.endswith(".down_proj.weight"))
        per = [[state.pop(f"{prefix}{e}.{p}_proj.weight") for p in ("gate", "up", "down")] for e in range(n)]
        state[key] = torch.stack([torch.cat([g, u]) for g, u, _ in per])  # (E, 2H, C): gate rows first
        state[prefix + "down_proj"] = torch.stack([d for _, _, d in per])  # (E, C, H)
    return state
