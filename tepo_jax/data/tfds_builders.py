"""tfds builders (array_record files, no TensorFlow needed) for the math and QA shapes.

Sources: local JSONL files (any `jsonl.LAYOUTS` layout) or the synthetic task family.
Build once, then read with `tfds.data_source(name, data_dir=...)` (random access, what grain
wants); records come back as dicts of bytes / lists of bytes, which `records.from_dict`
turns back into examples.

    MathJsonl(data_dir=d, splits={"train": "gsm8k_train.jsonl"}, layout="gsm8k")
        .download_and_prepare()
    src = tfds.data_source("math_jsonl", data_dir=d)["train"]
"""
from __future__ import annotations

import os
from typing import Mapping

import tensorflow_datasets as tfds
from etils import epath

from tepo_jax.data import synthetic
from tepo_jax.data.jsonl import read_jsonl

_TEXT = tfds.features.Text


class _LocalCode:
    """tfds looks up a builder's source through `importlib_resources` (not installed, and
    not needed): point it at this file directly."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

MATH_FEATURES = dict(id=_TEXT(), task=_TEXT(), question=_TEXT(), answer=_TEXT(), source=_TEXT())
QA_FEATURES = dict(id=_TEXT(), task=_TEXT(), question=_TEXT(),
                   answers=tfds.features.Sequence(_TEXT()),
                   supporting_passages=tfds.features.Sequence(_TEXT()), source=_TEXT())


class _JsonlBuilder(_LocalCode, tfds.core.GeneratorBasedBuilder):
    """Shared part: `splits` maps split name -> JSONL path (only needed when building)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    _FEATURES: dict = {}
    _DEFAULT_LAYOUT = ""

    def __init__(self, *, splits: Mapping[str, str | os.PathLike] | None = None,
                 layout: str | None = None, file_format: str = "array_record", **kwargs):
        self._splits = {k: os.fspath(v) for k, v in (splits or {}).items()}
        self._layout = layout or self._DEFAULT_LAYOUT
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self,
                                     features=tfds.features.FeaturesDict(self._FEATURES))

    def _split_generators(self, dl_manager):
        if not self._splits:
            raise ValueError(f"{self.name}: pass splits={{'train': 'path.jsonl', ...}} to build")
        return {name: self._generate_examples(path) for name, path in self._splits.items()}

    def _generate_examples(self, path):
        for i, ex in enumerate(read_jsonl(path, self._layout)):
            yield f"{i}", ex.to_dict()


class MathJsonl(_JsonlBuilder):
    """Math shape (question, answer) from JSONL; `layout` in math|gsm8k|math500|aime."""

    _FEATURES = MATH_FEATURES
    _DEFAULT_LAYOUT = "math"


class QaJsonl(_JsonlBuilder):
    """Multi-hop QA shape from JSONL; `layout` in qa|hotpotqa|2wiki|musique."""

    _FEATURES = QA_FEATURES
    _DEFAULT_LAYOUT = "qa"


class _SyntheticBuilder(_LocalCode, tfds.core.GeneratorBasedBuilder):
    """Synthetic tasks: `seed`, `n_train`, `n_eval` set at build time (train/eval disjoint)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    _FEATURES: dict = {}

    def __init__(self, *, seed: int = 0, n_train: int = 512, n_eval: int = 64,
                 file_format: str = "array_record", **kwargs):
        self._seed, self._n_train, self._n_eval = seed, n_train, n_eval
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self,
                                     features=tfds.features.FeaturesDict(self._FEATURES),
                                     metadata=tfds.core.MetadataDict(seed=self._seed))

    def _make(self, n):
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        rows = self._make(self._n_train + self._n_eval)
        return {"train": self._generate_examples(rows[:self._n_train]),
                "eval": self._generate_examples(rows[self._n_train:])}

    def _generate_examples(self, rows):
        for ex in rows:
            yield ex.id, ex.to_dict()


class SyntheticArithmetic(_SyntheticBuilder):
    """Arithmetic that needs the python tool (see `synthetic.make_big_arithmetic`)."""

    _FEATURES = MATH_FEATURES

    def _make(self, n):
        return synthetic.make_big_arithmetic(n, self._seed)


class SyntheticMultihop(_SyntheticBuilder):
    """Two-hop KB questions (see `synthetic.make_multihop`); the corpus stays JSONL
    (`synthetic.write_synthetic`), since the search index reads it from there."""

    _FEATURES = QA_FEATURES

    def _make(self, n):
        return synthetic.make_multihop(n, self._seed)[0]


def build(builder_cls, data_dir: str | os.PathLike, **kwargs) -> dict:
    """Builds `builder_cls` into `data_dir` (no-op if present) and returns its data sources
    per split (`tfds.data_source` objects: len() and random access)."""
    builder = builder_cls(data_dir=os.fspath(data_dir), **kwargs)
    builder.download_and_prepare()
    return tfds.data_source(builder.name, data_dir=os.fspath(data_dir))
