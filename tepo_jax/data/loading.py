"""The examples a run trains and evaluates on, read from its config.

`examples_from_config(config)` gives (train, eval, corpus path or None) for `config.data.task`:
the synthetic tasks (written into <workdir>/data from the seed), math/qa JSONL files (in
`data.layout`) or prepared tfds data dirs, or function-calling examples (JSONL, or the
synthetic function-calling task). `functions_from_config` gives the functions a
function-calling run may call.
"""
from __future__ import annotations

from etils import epath

from tepo_jax import paths
from tepo_jax.data import jsonl, synthetic
from tepo_jax.data.function_calling import (FUNCTION_CALLING, make_function_calling,
                                            read_function_calling, synthetic_functions)
from tepo_jax.data.pipeline import tfds_source
from tepo_jax.data.records import from_dict
from tepo_jax.errors import ConfigError
from tepo_jax.tools.functions import FunctionTool, function_from_schema

# A tfds data dir holds the dataset of the task's builder (tepo_jax/data/tfds_builders.py);
# train_path reads its train split, eval_path the first of these splits it has.
TFDS_DATASETS = {"math": "math_jsonl", "qa": "qa_jsonl"}
TRAIN_SPLITS, EVAL_SPLITS = ("train",), ("eval", "validation", "test")


def synthetic_data_dir(config) -> epath.Path:
    return paths.as_path(config.workdir) / "data"


def examples_from_config(config) -> tuple[list, list, str | None]:
    """(train, eval, corpus JSONL path or None) for the configured task."""
    if config.data.task == FUNCTION_CALLING:
        return (*function_calling_examples(config), None)
    if config.data.task == "synthetic":
        try:
            paths = synthetic.write_synthetic(synthetic_data_dir(config), seed=config.seed, n_train=config.data.n_train,
                                              n_eval=config.data.n_eval, mix=config.data.mix.to_dict())
        except ValueError as e:  # a family asked for more distinct questions than it has
            raise ConfigError(f"config.data.n_train / n_eval / mix: {e}") from None
        corpus = str(paths["corpus"]) if config.tools.search else None
        evals = jsonl.read_records(paths["eval"]) if config.data.n_eval else []  # n_eval=0 writes an empty file
        return jsonl.read_records(paths["train"]), evals, corpus
    train = read_examples(config, config.data.train_path, TRAIN_SPLITS)
    evals = read_examples(config, config.data.eval_path, EVAL_SPLITS) if config.data.eval_path else []
    return train, evals, config.tools.search_corpus or None


def read_examples(config, path: str, splits: tuple[str, ...]) -> list:
    """math/qa examples from a JSONL file (in data.layout) or a prepared tfds data dir."""
    if paths.as_path(path).is_dir():
        return tfds_examples(path, TFDS_DATASETS[config.data.task], splits)
    layout = config.data.task if config.data.layout == "auto" else config.data.layout
    return jsonl.read_jsonl(path, layout=layout)


def tfds_examples(data_dir: str, name: str, splits: tuple[str, ...]) -> list:
    # Imported here: tensorflow_datasets takes seconds to import, and only tfds data needs it.
    from tepo_jax.data import tfds_builders  # noqa: F401  (registers the builders with tfds)

    return [from_dict(row) for row in tfds_source(data_dir, name, splits)]


def function_calling_examples(config) -> tuple[list, list]:
    """JSONL examples (data.train_path / eval_path), or the synthetic task: n_train examples
    from `seed`, n_eval from `seed + 1` with every question seen in training left out."""
    if config.data.train_path:
        layout = FUNCTION_CALLING if config.data.layout == "auto" else config.data.layout
        train = read_function_calling(config.data.train_path, layout)
        evals = read_function_calling(config.data.eval_path, layout) if config.data.eval_path else []
        return train, evals
    train = make_function_calling(config.data.n_train, seed=config.seed)
    seen = {ex.question for ex in train}
    pool = make_function_calling(3 * config.data.n_eval, seed=config.seed + 1, id_prefix="fc-eval")
    return train, [ex for ex in pool if ex.question not in seen][: config.data.n_eval]


def functions_from_config(config, examples) -> list[FunctionTool]:
    """The functions the model may call: the synthetic APIs, or (JSONL data) a schema-only
    tool per distinct function name in the examples, the first schema seen winning."""
    if not config.data.train_path:
        return synthetic_functions()
    out = {}
    for ex in examples:
        for entry in ex.tools:
            tool = function_from_schema(entry)
            out.setdefault(tool.name, tool)
    return list(out.values())
