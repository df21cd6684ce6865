"""SQuAD-style normalised exact match and token F1 (max over the gold answers)."""
from __future__ import annotations

import collections
import re
import string
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation, drop articles a/an/the, collapse whitespace (the SQuAD
    v1.1 evaluation script's order)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def as_gold_list(gold: Sequence[str] | str) -> list[str]:
    return [gold] if isinstance(gold, str) else list(gold)


def exact_match(prediction: str, gold: Sequence[str] | str) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in as_gold_list(gold)))


def _f1_single(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        # Both empty after normalisation (e.g. gold "The") count as a match, as in SQuAD.
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, gold: Sequence[str] | str) -> float:
    golds = as_gold_list(gold)
    return max((_f1_single(prediction, g) for g in golds), default=0.0)
