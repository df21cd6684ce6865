"""Model configuration shared by the Qwen2 and Llama 3 families.

One decoder implements both families; everything that differs between them lives here:
qkv bias (Qwen2), llama3 rope scaling (Llama 3.1), tied embeddings (small Qwen2.5 models),
rope theta and norm epsilon. `from_hf_config` reads a transformers config.json in both its
old form (`rope_theta`, `rope_scaling`, `torch_dtype`) and its new form (`rope_parameters`,
`dtype`); `to_hf_config` writes the form transformers reads back.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax.numpy as jnp

SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}

# The one table of dtype names (configs, the CLI, HF config.json torch_dtype).
DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_named(name: str):
    """The jnp dtype of `name` (a DTYPES key or alias, any case); ValueError listing the
    names otherwise."""
    key = DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; one of {sorted(DTYPES) + sorted(DTYPE_ALIASES)}")
    return DTYPES[key]


class UnsupportedConfigError(ValueError):
    """A config.json this package cannot build a model from."""


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's frequency-dependent rope scaling (HF `rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a decoder-only transformer (Qwen2 / Llama 3 family)."""

    family: str  # "qwen2" | "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: Optional[Llama3RopeScaling] = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None
    # Numerics: parameters are stored in param_dtype and cast to dtype for compute.
    # Accelerators: bf16/bf16 (or fp32 params); tests: fp32/fp32.
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.family not in ("qwen2", "llama"):
            raise UnsupportedConfigError(f"unknown model family {self.family!r}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        """Parameter count from the shapes (what eval_shape of the model also gives)."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * h, self.num_kv_heads * h
        attn = d * q + 2 * d * kv + q * d
        attn += (q + 2 * kv) * self.qkv_bias + d * self.o_bias
        mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.num_layers * per_layer + self.vocab_size * d + d + head


def _dtype_from_name(name: Optional[str], default):
    if name is None:
        return default
    if name not in DTYPES:
        raise UnsupportedConfigError(f"unsupported dtype {name!r} in config.json")
    return DTYPES[name]


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, Optional[Llama3RopeScaling]]:
    """Rope theta and scaling from either `rope_parameters` (new) or `rope_theta`/`rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise UnsupportedConfigError(f"unsupported rope_type {rope_type!r} (supported: default, llama3)")
    return float(theta), Llama3RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def from_hf_config(hf: Mapping[str, Any], *, dtype=None, param_dtype=None) -> ModelConfig:
    """Build a ModelConfig from a transformers config.json dict.

    `param_dtype` defaults to the checkpoint's stored dtype (`dtype` or `torch_dtype`);
    `dtype` (compute) defaults to the same.
    """
    archs = hf.get("architectures") or []
    family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if family is None:
        family = {"qwen2": "qwen2", "llama": "llama"}.get(hf.get("model_type"))
    if family is None:
        raise UnsupportedConfigError(
            f"unsupported architecture {archs or hf.get('model_type')!r}; supported: "
            f"{sorted(SUPPORTED_ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedConfigError(f"unsupported hidden_act {hf['hidden_act']!r} (supported: silu)")
    if hf.get("use_sliding_window"):
        raise UnsupportedConfigError("sliding-window attention (use_sliding_window: true) is not supported")
    try:
        theta, scaling = _rope_from_hf(hf)
        stored = _dtype_from_name(hf.get("dtype") or hf.get("torch_dtype"), jnp.float32)
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        attention_bias = bool(hf.get("attention_bias", False))
        return ModelConfig(
            family=family,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=_ids(hf.get("eos_token_id")),  # int, or a list (Llama 3.1 Instruct)
            dtype=dtype or param_dtype or stored,
            param_dtype=param_dtype or stored,
        )
    except KeyError as e:
        raise UnsupportedConfigError(f"config.json is missing the field {e.args[0]!r}") from None


def _ids(value):
    """A token id field as stored in ModelConfig: None, an int, or a tuple of ints (hashable)."""
    return tuple(int(i) for i in value) if isinstance(value, (list, tuple)) else value


def dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def to_hf_config(cfg: ModelConfig, *, dtype=None) -> dict[str, Any]:
    """The transformers config.json dict for `cfg` (new `rope_parameters` / `dtype` form)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope.update(rope_type="llama3", **dataclasses.asdict(cfg.rope_scaling))
    out: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if cfg.family == "qwen2" else "LlamaForCausalLM"],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": rope,
        # The older field names too, so transformers 4.x reads the same rope settings.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if cfg.rope_scaling is None else dict(rope, type="llama3"),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": "silu",
        "dtype": dtype_name(dtype or cfg.param_dtype),
        "torch_dtype": dtype_name(dtype or cfg.param_dtype),
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
    }
    if cfg.family == "llama":
        out.update(attention_bias=cfg.o_bias, mlp_bias=cfg.mlp_bias)
    elif cfg.o_bias or cfg.mlp_bias:
        raise UnsupportedConfigError("Qwen2 checkpoints have no o_proj or MLP biases")
    return out
