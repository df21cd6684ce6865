"""Model presets named after the HF models, with their published parameter counts.

`PUBLISHED_PARAMS` holds the counts stated by the model cards (in billions, as rounded there);
tests check each preset's eval_shape parameter count against them.
"""
from __future__ import annotations

from tepo_jax.models.config import Llama3RopeScaling, ModelConfig


def _qwen25(hidden, inter, layers, heads, kv, vocab, tied, eps=1e-6):
    return dict(family="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
                rms_norm_eps=eps, rope_theta=1_000_000.0, tie_word_embeddings=tied, qkv_bias=True,
                max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151643)


def _llama31(hidden, inter, layers, heads):
    return dict(family="llama", vocab_size=128256, hidden_size=hidden, intermediate_size=inter,
                num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                rope_theta=500_000.0, rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 8192),
                tie_word_embeddings=False, max_position_embeddings=131072,
                bos_token_id=128000, eos_token_id=128001)


_BASE = {
    "Qwen2.5-0.5B": _qwen25(896, 4864, 24, 14, 2, 151936, tied=True),
    "Qwen2.5-1.5B": _qwen25(1536, 8960, 28, 12, 2, 151936, tied=True),
    "Qwen2.5-3B": _qwen25(2048, 11008, 36, 16, 2, 151936, tied=True),
    "Qwen2.5-7B": _qwen25(3584, 18944, 28, 28, 4, 152064, tied=False),
    "Qwen2.5-14B": _qwen25(5120, 13824, 48, 40, 8, 152064, tied=False, eps=1e-5),
    "Qwen2.5-32B": _qwen25(5120, 27648, 64, 40, 8, 152064, tied=False, eps=1e-5),
    "Qwen2.5-72B": _qwen25(8192, 29568, 80, 64, 8, 152064, tied=False, eps=1e-5),
    "Llama-3.1-8B": _llama31(4096, 14336, 32, 32),
    "Llama-3.1-70B": _llama31(8192, 28672, 80, 64),
    "Llama-3.1-405B": _llama31(16384, 53248, 126, 128),
}

# Published totals in billions, with the number of decimals the model card uses.
PUBLISHED_PARAMS = {
    "Qwen2.5-0.5B": 0.49, "Qwen2.5-1.5B": 1.54, "Qwen2.5-3B": 3.09, "Qwen2.5-7B": 7.61,
    "Qwen2.5-14B": 14.7, "Qwen2.5-32B": 32.5, "Qwen2.5-72B": 72.7,
    "Llama-3.1-8B": 8.03, "Llama-3.1-70B": 70.6, "Llama-3.1-405B": 405.9,
}

# The -Instruct models share the base models' shapes; their config.json eos_token_id is the
# chat turn token (Qwen2.5: <|im_end|>) or, for Llama 3.1, the list of <|end_of_text|>,
# <|eom_id|> and <|eot_id|>.
_INSTRUCT_EOS = {"qwen2": 151645, "llama": (128001, 128008, 128009)}

PRESETS: dict[str, dict] = dict(_BASE)
for _name, _kw in _BASE.items():
    PRESETS[_name + "-Instruct"] = dict(_kw, eos_token_id=_INSTRUCT_EOS[_kw["family"]])
    PUBLISHED_PARAMS[_name + "-Instruct"] = PUBLISHED_PARAMS[_name]


def preset(name: str, **overrides) -> ModelConfig:
    """ModelConfig for an HF model name, e.g. preset("Qwen2.5-0.5B", dtype=jnp.bfloat16)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
