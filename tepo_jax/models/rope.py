"""Rotary position embeddings, with Llama 3.1's frequency-dependent scaling.

Layout follows transformers (rotate-half, not interleaved), so HF weights need no permutation.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from tepo_jax.models.config import Llama3RopeScaling


def inverse_frequencies(head_dim: int, theta: float,
                        scaling: Optional[Llama3RopeScaling] = None) -> np.ndarray:
    """float32[head_dim // 2]; computed in float64 numpy once, at trace time."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is not None:
        inv_freq = _llama3_scale(inv_freq, scaling)
    return inv_freq.astype(np.float32)


def _llama3_scale(inv_freq: np.ndarray, s: Llama3RopeScaling) -> np.ndarray:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, blended, scaled)


class RopeTables(NamedTuple):
    """cos/sin of the rotation angles, float32, computed once per forward for all layers.

    Shapes [B, T, 1, 1, F] (cos) and [B, T, 1, 2, F] (sin, with the rotate-half sign folded in:
    −sin for the first half, +sin for the second), F = head_dim // 2, broadcasting over heads.
    """

    cos: jnp.ndarray
    sin: jnp.ndarray


def rope_tables(positions: jnp.ndarray, inv_freq: np.ndarray) -> RopeTables:
    """positions int[B, T] -> RopeTables (the transcendental part of RoPE, shared by q and k
    of every layer)."""
    angles = positions[..., None, None, None].astype(jnp.float32) * inv_freq  # B,T,1,1,F
    sin = jnp.sin(angles)
    return RopeTables(jnp.cos(angles), jnp.concatenate([-sin, sin], axis=-2))


def apply_rope(x: jnp.ndarray, rope: RopeTables) -> jnp.ndarray:
    """x: [B, T, N, H] -> [B, T, N, H] (same dtype as x); rotate-half layout.

    With x = [x1, x2] (halves): [x1·cos − x2·sin, x2·cos + x1·sin]. The halves are the pair
    axis of a [.., 2, F] view and rotate-half is a flip of that axis (sign in `rope.sin`), so
    forward and backward are elementwise (no concatenate of halves, whose gradient is pads).
    """
    *lead, h = x.shape
    x32 = x.astype(jnp.float32).reshape(*lead, 2, h // 2)
    out = x32 * rope.cos + jnp.flip(x32, axis=-2) * rope.sin
    return out.reshape(*lead, h).astype(x.dtype)
