"""The one table between transformers' tensor names and our parameter paths.

Each rule says how an HF tensor becomes ours and back. HF Linear weights are [out, in]; ours
put the input dimension first and split heads out, e.g. q_proj.weight [N*H, D] -> [D, N, H]
and o_proj.weight [D, N*H] -> [N, H, D]. Loading reads the table forwards, export backwards.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from tepo_jax.models.config import ModelConfig

Path = tuple  # an nnx state path, e.g. ("layers", 0, "attn", "q_proj")


def _copy_to_ours(w, shape):  # same layout
    return w.reshape(shape)


def _copy_to_hf(x):
    return x


def _flatten_to_hf(x):  # bias [N, H] -> [N*H]
    return x.reshape(-1)


def _linear_in_to_ours(w, shape):  # [out..., in] -> [in, out...]: input dim first in ours
    return w.T.reshape(shape)


def _linear_in_to_hf(x):  # [D, N, H] -> [N*H, D]
    return x.reshape(x.shape[0], -1).T


def _linear_out_to_ours(w, shape):  # o_proj [D, N*H] -> [N, H, D]
    return w.T.reshape(shape)


def _linear_out_to_hf(x):  # [N, H, D] -> [D, N*H]
    return x.reshape(-1, x.shape[-1]).T


@dataclasses.dataclass(frozen=True)
class Kind:
    to_ours: Callable[[np.ndarray, tuple], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: Callable[[tuple], tuple]


COPY = Kind(_copy_to_ours, _copy_to_hf, lambda s: s)
FLATTEN = Kind(_copy_to_ours, _flatten_to_hf, lambda s: (math.prod(s),))
LINEAR_IN = Kind(_linear_in_to_ours, _linear_in_to_hf, lambda s: (math.prod(s[1:]), s[0]))
LINEAR_OUT = Kind(_linear_out_to_ours, _linear_out_to_hf, lambda s: (s[-1], math.prod(s[:-1])))


@dataclasses.dataclass(frozen=True)
class Rule:
    hf_name: str
    path: Path
    kind: Kind


def _layer_rules(cfg: ModelConfig, i: int) -> list[Rule]:
    hf, ours = f"model.layers.{i}.", ("layers", i)
    rules = [Rule(hf + "input_layernorm.weight", ours + ("input_norm", "scale"), COPY),
             Rule(hf + "post_attention_layernorm.weight", ours + ("post_attn_norm", "scale"), COPY)]
    for p in ("q", "k", "v"):
        rules.append(Rule(hf + f"self_attn.{p}_proj.weight", ours + ("attn", f"{p}_proj"), LINEAR_IN))
        if cfg.qkv_bias:
            rules.append(Rule(hf + f"self_attn.{p}_proj.bias", ours + ("attn", f"{p}_bias"), FLATTEN))
    rules.append(Rule(hf + "self_attn.o_proj.weight", ours + ("attn", "o_proj"), LINEAR_OUT))
    if cfg.o_bias:
        rules.append(Rule(hf + "self_attn.o_proj.bias", ours + ("attn", "o_bias"), COPY))
    for p in ("gate", "up", "down"):
        rules.append(Rule(hf + f"mlp.{p}_proj.weight", ours + ("mlp", f"{p}_proj"), LINEAR_IN))
        if cfg.mlp_bias:
            rules.append(Rule(hf + f"mlp.{p}_proj.bias", ours + ("mlp", f"{p}_bias"), COPY))
    return rules


def name_map(cfg: ModelConfig) -> list[Rule]:
    """Every tensor of a checkpoint for `cfg`, in model order (embedding, layers, norm, head)."""
    rules = [Rule("model.embed_tokens.weight", ("embed",), COPY)]
    for i in range(cfg.num_layers):
        rules += _layer_rules(cfg, i)
    rules.append(Rule("model.norm.weight", ("final_norm", "scale"), COPY))
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head",), LINEAR_IN))
    return rules
