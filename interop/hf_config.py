"""Hugging Face `config.json` <-> our `ModelConfig`, for the transformers architectures our decoder
is: MixtralForCausalLM and Qwen3MoeForCausalLM (which also cover the presets mixtral_8x22b and
qwen3_235b_a22b).

- `architecture_for(cfg)`: the architecture a model config exports as, or a ValueError naming each
  feature of ours that it cannot hold (sigmoid or group-limited routing, a routing scale, shared
  experts, GELU experts, a non-zero expert bias is checked on the weights: interop/hf_export.py).
- `model_fields_from_hf(hf)`: what an HF config says about the fields of ours that decide the
  weights and the forward; refuses what our decoder does not compute (a RoPE scaling, a sliding
  window, attention biases, another activation, dense layers other than the first k).
- `check_matches(cfg, hf)`: a run that starts from HF weights must have the same architecture;
  every difference is listed as the override that fixes it.
- `hf_config_for(cfg, ...)`: the config.json an export writes.

DeepSeek-V3 (configs/model/deepseek_v3.yaml) has no counterpart: our decoder has GQA attention where
DeepSeek-V3 has multi-head latent attention, and shared experts without Qwen2-MoE's sigmoid gate.
Training-only settings (balancing-loss coefficients, z-loss, capacity factor, expert bias updates,
init) are not part of the architecture: an import keeps the run's, an export writes
router_aux_loss_coef and drops the rest.
"""

from __future__ import annotations

from typing import Any

from moe.config import ModelConfig, MoEConfig, require

MIXTRAL = "MixtralForCausalLM"
QWEN3_MOE = "Qwen3MoeForCausalLM"
ARCHITECTURES = (MIXTRAL, QWEN3_MOE)
MODEL_TYPES = {MIXTRAL: "mixtral", QWEN3_MOE: "qwen3_moe"}
EXPORT_DTYPES = ("bfloat16", "float32")  # what an export writes (published checkpoints: bfloat16)
_HF_ACT = "silu"  # SwiGLU's gate activation, the only one our experts have


def architecture_for(cfg: ModelConfig) -> str:
    """MixtralForCausalLM (no qk-norm, renormalised top-k) or Qwen3MoeForCausalLM (qk-norm); a
    ValueError listing every feature of `cfg` neither holds."""
    moe = cfg.moe
    problems = []
    if moe.score_func != "softmax":
        problems.append(f"model.moe.score_func={moe.score_func!r} (HF: softmax)")
    if moe.num_groups != 1:
        problems.append(f"model.moe.num_groups={moe.num_groups} (group-limited routing; HF: 1)")
    if moe.routed_scaling_factor != 1.0:
        problems.append(f"model.moe.routed_scaling_factor={moe.routed_scaling_factor} (HF: 1.0)")
    if moe.num_shared_experts:
        problems.append(f"model.moe.num_shared_experts={moe.num_shared_experts} (HF: 0)")
    if moe.activation != "swiglu":
        problems.append(f"model.moe.activation={moe.activation!r} (HF: swiglu)")
    arch = QWEN3_MOE if cfg.qk_norm else MIXTRAL
    if arch == MIXTRAL:
        if not moe.norm_topk_prob:
            problems.append("model.moe.norm_topk_prob=false (Mixtral renormalises; Qwen3-MoE needs model.qk_norm=true)")
        if cfg.first_k_dense:
            problems.append(f"model.first_k_dense={cfg.first_k_dense} (Mixtral has no dense layers)")
    require(not problems, f"model {cfg.name!r} has no Hugging Face architecture ({', '.join(ARCHITECTURES)}): "
                          + "; ".join(problems))  # fmt: skip
    return arch


def check_exportable_at_end(cfg: ModelConfig) -> None:
    """checkpoint.export_hf_at_end: refuse at the start what the end-of-run export would refuse."""
    architecture_for(cfg)
    require(not cfg.moe.expert_bias,
            "checkpoint.export_hf_at_end=true with model.moe.expert_bias=true: the trained router bias has "
            "no place in HF's routers; export the checkpoint with tools/hf_export.py --drop-expert-bias")  # fmt: skip


def _rope_theta(hf: dict[str, Any]) -> float:
    """rope_parameters (transformers 5) or the top-level rope_theta / rope_scaling (earlier files)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", scaling.get("rope_type", scaling.get("type", "default"))))
    require(rope_type == "default",
            f"HF config: rope type {rope_type!r}; our decoder computes plain RoPE only (rope_type 'default')")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    require(theta is not None, "HF config: no rope_theta (in rope_parameters or at the top level)")
    return float(theta)


def _dense_layers(hf: dict[str, Any], arch: str, n_layers: int) -> int:
    """Qwen3-MoE's dense layers as our first_k_dense: `mlp_only_layers` must be 0 .. k-1 and every
    other layer sparse."""
    if arch != QWEN3_MOE:
        return 0
    step = hf.get("decoder_sparse_step", 1)
    only = sorted(hf.get("mlp_only_layers") or [])
    require(step == 1, f"HF config: decoder_sparse_step={step}; our decoder's dense layers are the first k (step 1)")
    require(only == list(range(len(only))),
            f"HF config: mlp_only_layers={only}; our decoder's dense layers are the first k: 0 .. k-1")
    return len(only)


def hf_architecture(hf: dict[str, Any]) -> str:
    """The supported architecture an HF config names, or a ValueError."""
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    require(arch is not None,
            f"HF config: architectures={archs}; supported: {list(ARCHITECTURES)} (DeepSeek-V3's multi-head "
            f"latent attention and Qwen2-MoE's gated shared expert have no counterpart here)")  # fmt: skip
    return arch


def model_fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields (dotted, `moe.` for the MoE ones) an HF config fixes; ValueError for a
    config our decoder does not compute."""
    arch = hf_architecture(hf)
    act = hf.get("hidden_act", _HF_ACT)
    require(act == _HF_ACT, f"HF config: hidden_act={act!r}; our experts are SwiGLU (silu)")
    require(not hf.get("attention_bias", False), "HF config: attention_bias=true; our attention has no biases")
    n_layers = int(hf["num_hidden_layers"])
    window = hf.get("sliding_window") if hf.get("use_sliding_window", arch == MIXTRAL) else None
    k_dense = _dense_layers(hf, arch, n_layers)
    n_heads = int(hf["num_attention_heads"])
    fields: dict[str, Any] = {
        "vocab_size": int(hf["vocab_size"]),
        "dim": int(hf["hidden_size"]),
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": int(hf.get("num_key_value_heads") or n_heads),
        "head_dim": int(hf.get("head_dim") or 0),
        "max_seq_len": int(hf.get("max_position_embeddings", 4096)),
        "rope_theta": _rope_theta(hf),
        "norm_eps": float(hf["rms_norm_eps"]),
        "qk_norm": arch == QWEN3_MOE,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "first_k_dense": k_dense,
        "moe.num_experts": int(hf.get("num_local_experts", hf.get("num_experts", 0))),
        "moe.top_k": int(hf["num_experts_per_tok"]),
        "moe.ffn_dim": int(hf["intermediate_size"] if arch == MIXTRAL else hf["moe_intermediate_size"]),
        "moe.activation": "swiglu",
        "moe.score_func": "softmax",
        "moe.norm_topk_prob": True if arch == MIXTRAL else bool(hf.get("norm_topk_prob", False)),
        "moe.num_groups": 1,
        "moe.routed_scaling_factor": 1.0,
        "moe.num_shared_experts": 0,
        "moe.aux_loss_coeff": float(hf.get("router_aux_loss_coef", 0.0)),
    }
    if k_dense:
        fields["dense_ffn_dim"] = int(hf["intermediate_size"])
    if window is not None:
        # Attention equals ours only where no query looks further back than the window.
        fields["sliding_window"] = int(window)
    return fields


def model_config_from_hf(hf: dict[str, Any], name: str = "hf") -> ModelConfig:
    """A ModelConfig of the HF model's architecture (other fields at their defaults)."""
    fields = model_fields_from_hf(hf)
    fields.pop("sliding_window", None)
    moe = MoEConfig(**{k[4:]: v for k, v in fields.items() if k.startswith("moe.")})
    cfg = ModelConfig(name=name, moe=moe, **{k: v for k, v in fields.items() if not k.startswith("moe.")})
    cfg.validate()
    return cfg


# Not compared field by field: a run keeps its own length and loss coefficient; the others are
# compared below by what they mean (head_dim 0 is dim / heads, a vocabulary may be padded).
_NOT_COMPARED = ("max_seq_len", "moe.aux_loss_coeff", "vocab_size", "head_dim", "sliding_window")


def _get(cfg: ModelConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check_matches(cfg: ModelConfig, hf: dict[str, Any], source: str) -> int:
    """Refuse a model config whose architecture differs from HF config `hf` (from `source`); every
    difference is named with the override that fixes it. Returns HF's vocabulary size (ours may
    be larger: padding)."""
    fields = model_fields_from_hf(hf)
    wrong = [f"model.{k}={fields[k]!r} (this run: {_get(cfg, k)!r})" for k in fields
             if k not in _NOT_COMPARED and _get(cfg, k) != fields[k]]  # fmt: skip
    hf_head_dim = fields["head_dim"] or fields["dim"] // fields["n_heads"]
    if cfg.attn_head_dim != hf_head_dim:
        wrong.append(f"model.head_dim={hf_head_dim} (this run: {cfg.attn_head_dim})")
    if cfg.vocab_size < fields["vocab_size"]:
        wrong.append(f"model.vocab_size={fields['vocab_size']} or more (this run: {cfg.vocab_size})")
    window = fields.get("sliding_window")
    if window is not None and window < cfg.max_seq_len:
        wrong.append(f"model.max_seq_len={window} or less: HF attends within a sliding window of {window} "
                     f"tokens, ours over the whole sequence (this run: {cfg.max_seq_len})")  # fmt: skip
    require(not wrong, f"{source}: the model config differs from the Hugging Face model's; set\n  "
                       + "\n  ".join(wrong))  # fmt: skip
    return fields["vocab_size"]


def hf_config_for(cfg: ModelConfig, arch: str, dtype: str, vocab_size: int,
                  base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config.json of `cfg` exported as `arch` with `vocab_size` rows (ours cut to it) in
    `dtype`. base: an HF config whose other keys (token ids, ...) are kept, e.g. the one a run
    started from."""
    moe = cfg.moe
    out = dict(base or {})
    for stale in ("rope_scaling", "transformers_version"):
        out.pop(stale, None)
    out.update({
        "architectures": [arch],
        "model_type": MODEL_TYPES[arch],
        "vocab_size": vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.attn_head_dim,
        "hidden_act": _HF_ACT,
        # The base model's context length and init scale, when there is one: ours are a run's choices.
        "max_position_embeddings": out.get("max_position_embeddings", cfg.max_seq_len),
        "rms_norm_eps": cfg.norm_eps,
        # Both spellings: transformers 5 reads rope_parameters, earlier releases rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": out.get("initializer_range", cfg.init_std),
        "num_experts_per_tok": moe.top_k,
        "router_aux_loss_coef": moe.aux_loss_coeff,
        "dtype": dtype,
        "torch_dtype": dtype,
    })
    if arch == MIXTRAL:
        out.update({"num_local_experts": moe.num_experts, "intermediate_size": moe.ffn_dim, "sliding_window": None})
    else:
        out.update({
            "num_experts": moe.num_experts,
            "moe_intermediate_size": moe.ffn_dim,
            "intermediate_size": cfg.dense_ffn_dim if cfg.first_k_dense else out.get("intermediate_size", moe.ffn_dim),
            "norm_topk_prob": moe.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": list(range(cfg.first_k_dense)),
            "use_sliding_window": False,
            "sliding_window": None,
            "attention_bias": False,
        })
        out.pop("num_local_experts", None)
    return out
