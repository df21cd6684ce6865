"""Model configuration shared by the Qwen2 and Llama 3 families.

One decoder implements both families; everything that differs between them lives here:
qkv bias (Qwen2), llama3 rope scaling (Llama 3.1), tied embeddings (small Qwen2.5 models),
rope theta and norm epsilon. `from_hf_config` reads a transformers config.json in both its
old form (`rope_theta`, `rope_scaling`, `torch_dtype`) and its new form (`rope_parameters`,
`dtype`); `to_hf_config` writes the form transformers reads back.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax.numpy as jnp

SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}
MODEL_TYPES = {"qwen2": "qwen2", "llama": "llama"}  # config.json model_type -> family

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


def _dtype_from_name(field: str, name: Any, default):
    if name is None:
        return default
    if not isinstance(name, str) or name not in DTYPES:
        raise UnsupportedConfigError(f"{field} must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


# ---------------------------------------------------------------- config.json field checks
# Small pure functions: each returns the checked value or raises UnsupportedConfigError naming
# the field (the loader prefixes the file). JSON `null` in an optional field means "absent".

_REQUIRED = object()


def _field(hf: Mapping[str, Any], name: str, default: Any = _REQUIRED) -> Any:
    """hf[name]; `default` when absent or null (a required field: an error when absent)."""
    if name not in hf:
        if default is _REQUIRED:
            raise UnsupportedConfigError(f"config.json is missing the field {name!r}")
        return default
    value = hf[name]
    return default if value is None and default is not _REQUIRED else value


def _positive_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UnsupportedConfigError(f"{field} must be a positive integer, got {value!r}")
    return value


def _positive_float(field: str, value: Any) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value <= 0):
        raise UnsupportedConfigError(f"{field} must be a finite number > 0, got {value!r}")
    return float(value)


def _flag(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UnsupportedConfigError(f"{field} must be true or false, got {value!r}")
    return value


def _object_or_none(field: str, value: Any) -> Optional[Mapping[str, Any]]:
    if value is not None and not isinstance(value, Mapping):
        raise UnsupportedConfigError(f"{field} must be an object or null, got {value!r}")
    return value


def _token_ids(field: str, value: Any):
    """A token id field as stored in ModelConfig: None, an int >= 0, or a tuple of them
    (hashable; Llama 3.1 Instruct lists several eos ids)."""
    def one(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise UnsupportedConfigError(f"{field} must be a token id (an integer >= 0) or a list of them, "
                                         f"got {value!r}")
        return v
    if value is None:
        return None
    return tuple(one(v) for v in value) if isinstance(value, list) else one(value)


def _check_not_quantized(hf: Mapping[str, Any]) -> None:
    """Quantized weights (fp8 with weight_scale tensors, awq/gptq qweight/scales, ...) are
    stored under other names and dtypes; refuse them before any tensor is looked at, so the
    error says why instead of naming the first odd tensor."""
    quant = hf.get("quantization_config")
    if quant is None:
        return
    method = quant.get("quant_method", "unknown") if isinstance(quant, Mapping) else "unknown"
    raise UnsupportedConfigError(f"quantized checkpoint (quant_method {method}) is not supported; "
                                 "use the unquantized (bf16/fp16/fp32) weights")


def _family_from_hf(hf: Mapping[str, Any]) -> str:
    """The model family from `architectures` and `model_type` together: every listed class must
    be supported, and a model_type present must be that class's."""
    archs, model_type = hf.get("architectures"), hf.get("model_type")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise UnsupportedConfigError(f"architectures must be a list of class names, got {archs!r}")
    if model_type is not None and not isinstance(model_type, str):
        raise UnsupportedConfigError(f"model_type must be a string, got {model_type!r}")
    if archs:
        if any(a not in SUPPORTED_ARCHITECTURES for a in archs):
            raise UnsupportedConfigError(
                f"unsupported architecture {archs!r} in architectures; supported: "
                f"{sorted(SUPPORTED_ARCHITECTURES)}")
        families = {SUPPORTED_ARCHITECTURES[a] for a in archs}
        if len(families) > 1:
            raise UnsupportedConfigError(f"architectures {archs!r} name more than one model family")
        (family,) = families
        if model_type is not None and MODEL_TYPES.get(model_type) != family:
            raise UnsupportedConfigError(f"architectures {archs!r} does not match model_type {model_type!r}")
        return family
    if model_type not in MODEL_TYPES:
        raise UnsupportedConfigError(
            f"unsupported architecture {model_type!r} (no architectures; model_type must be one of "
            f"{sorted(MODEL_TYPES)})")
    return MODEL_TYPES[model_type]


def _heads_from_hf(hf: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """(hidden_size, num_heads, num_kv_heads, head_dim), checked against each other."""
    hidden = _positive_int("hidden_size", _field(hf, "hidden_size"))
    heads = _positive_int("num_attention_heads", _field(hf, "num_attention_heads"))
    kv = _positive_int("num_key_value_heads", _field(hf, "num_key_value_heads", heads))
    if heads % kv:
        raise UnsupportedConfigError(
            f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    head_dim = _field(hf, "head_dim", None)
    if head_dim is None:
        if hidden % heads:
            raise UnsupportedConfigError(
                f"hidden_size={hidden} is not divisible by num_attention_heads={heads} (and no head_dim)")
        head_dim = hidden // heads
    return hidden, heads, kv, _positive_int("head_dim", head_dim)


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, Optional[Llama3RopeScaling]]:
    """Rope theta and scaling from either `rope_parameters` (new) or `rope_theta`/`rope_scaling`."""
    params = _object_or_none("rope_parameters", hf.get("rope_parameters")) or {}
    scaling = _object_or_none("rope_scaling", hf.get("rope_scaling"))
    where = "rope_scaling" if scaling else "rope_parameters"
    scaling = scaling or params
    if params.get("rope_theta") is not None:
        theta = _positive_float("rope_parameters.rope_theta", params["rope_theta"])
    else:
        theta = _positive_float("rope_theta", _field(hf, "rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise UnsupportedConfigError(f"unsupported rope_type {rope_type!r} (supported: default, llama3)")

    def get(name, check):
        if name not in scaling:
            raise UnsupportedConfigError(f"config.json is missing the field '{where}.{name}'")
        return check(f"{where}.{name}", scaling[name])

    return theta, Llama3RopeScaling(
        factor=get("factor", _positive_float),
        low_freq_factor=get("low_freq_factor", _positive_float),
        high_freq_factor=get("high_freq_factor", _positive_float),
        original_max_position_embeddings=get("original_max_position_embeddings", _positive_int),
    )


def from_hf_config(hf: Mapping[str, Any], *, dtype=None, param_dtype=None) -> ModelConfig:
    """Build a ModelConfig from a transformers config.json dict.

    `param_dtype` defaults to the checkpoint's stored dtype (`dtype` or `torch_dtype`);
    `dtype` (compute) defaults to the same. Every field read is checked for type and range: a
    malformed one is an UnsupportedConfigError naming it (JSON null in an optional field means
    its default).
    """
    if not isinstance(hf, Mapping):
        raise UnsupportedConfigError(f"the top level must be a JSON object, got {type(hf).__name__}")
    _check_not_quantized(hf)
    family = _family_from_hf(hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedConfigError(f"unsupported hidden_act {hf['hidden_act']!r} (supported: silu)")
    if _flag("use_sliding_window", _field(hf, "use_sliding_window", False)):
        raise UnsupportedConfigError("sliding-window attention (use_sliding_window: true) is not supported")
    theta, scaling = _rope_from_hf(hf)
    dtype_field = "dtype" if hf.get("dtype") else "torch_dtype"
    stored = _dtype_from_name(dtype_field, hf.get(dtype_field) or None, jnp.float32)
    hidden, num_heads, num_kv_heads, head_dim = _heads_from_hf(hf)
    # Llama's attention_bias covers q/k/v and o_proj; Qwen2 always has q/k/v biases and never an
    # o_proj or MLP bias (transformers ignores attention_bias / mlp_bias there, so do we).
    attention_bias = family == "llama" and _flag("attention_bias", _field(hf, "attention_bias", False))
    mlp_bias = family == "llama" and _flag("mlp_bias", _field(hf, "mlp_bias", False))
    return ModelConfig(
        family=family,
        vocab_size=_positive_int("vocab_size", _field(hf, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=_positive_int("intermediate_size", _field(hf, "intermediate_size")),
        num_layers=_positive_int("num_hidden_layers", _field(hf, "num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_positive_float("rms_norm_eps", _field(hf, "rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=_flag("tie_word_embeddings", _field(hf, "tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or attention_bias,
        o_bias=attention_bias,
        mlp_bias=mlp_bias,
        max_position_embeddings=_positive_int("max_position_embeddings",
                                              _field(hf, "max_position_embeddings", 32768)),
        bos_token_id=_token_ids("bos_token_id", hf.get("bos_token_id")),
        eos_token_id=_token_ids("eos_token_id", hf.get("eos_token_id")),
        dtype=dtype or param_dtype or stored,
        param_dtype=param_dtype or stored,
    )


def dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def to_hf_config(cfg: ModelConfig, *, dtype=None) -> dict[str, Any]:
    """The transformers config.json dict for `cfg` (new `rope_parameters` / `dtype` form).
    UnsupportedConfigError when config.json cannot describe `cfg`'s biases."""
    _check_hf_biases(cfg)
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
    return out


def _check_hf_biases(cfg: ModelConfig) -> None:
    """config.json can only describe the bias sets transformers builds; any other set would be
    written as tensors it silently drops (or that our own loader refuses)."""
    if cfg.family == "llama" and cfg.qkv_bias != cfg.o_bias:
        raise UnsupportedConfigError(
            f"cannot export a Llama config with qkv_bias={cfg.qkv_bias} and o_bias={cfg.o_bias}: "
            "config.json's one attention_bias field covers q/k/v and o_proj together")
    if cfg.family == "qwen2" and not cfg.qkv_bias:
        raise UnsupportedConfigError("cannot export a Qwen2 config with qkv_bias=False: "
                                     "Qwen2 checkpoints always have q/k/v biases")
    if cfg.family == "qwen2" and (cfg.o_bias or cfg.mlp_bias):
        raise UnsupportedConfigError("cannot export a Qwen2 config with o_bias or mlp_bias: "
                                     "Qwen2 checkpoints have no o_proj or MLP biases")
