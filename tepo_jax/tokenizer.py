"""Loading HF tokenizers and turning chats into prompt token ids.

The rollout works token-in, token-out: the prompt is encoded once here (through the model's
own chat template) and everything after it is appended as ids, never re-encoded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from tepo_jax import paths
from tepo_jax.builtin_tokenizers import cached_tokenizer_dir
from tepo_jax.tiny_tokenizer import build_tiny_fc_tokenizer, build_tiny_tokenizer

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
# tokenizer_config.json classes that mean "exactly what tokenizer.json says".
_GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


class TokenizerLoadError(ValueError):
    """A tokenizer directory is missing or unusable; the message is one line."""


def load_tokenizer(path: str | Path, **kwargs: Any):
    """Loads an HF tokenizer directory (tokenizer.json / tokenizer_config.json) offline; a
    remote one (gs://...) from a local copy, since transformers reads local files only."""
    if paths.is_remote(path):
        if not paths.as_path(path).is_dir():
            raise TokenizerLoadError(f"tokenizer directory not found: {str(path)!r}")
        with paths.local_copy(path) as local:
            return load_tokenizer(local, **kwargs)
    p = Path(path)
    if not p.is_dir():
        raise TokenizerLoadError(f"tokenizer directory not found: {str(p)!r}")
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
        raise TokenizerLoadError(
            f"no tokenizer files in {str(p)!r}: expected one of {', '.join(_TOKENIZER_FILES)}")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    # Next to a config.json (an exported checkpoint), AutoTokenizer picks the model family's
    # class (Qwen2Tokenizer for model_type qwen2), which rebuilds its own pre-tokenizer and
    # silently splits text differently from the tokenizer.json it was saved with. A directory
    # that names the generic class is loaded with it, so the ids are the ones trained on.
    loader = PreTrainedTokenizerFast if _config_class(p) in _GENERIC_CLASSES else AutoTokenizer
    try:
        return loader.from_pretrained(str(p), local_files_only=True, **kwargs)
    except Exception as e:  # transformers raises many types; collapse to one readable line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerLoadError(f"cannot load tokenizer from {str(p)!r}: {first}") from e


# The demo tokenizer's numbers below this are one token each (Llama 3 cuts digit runs into
# chunks of up to three digits): a 2-layer model copies a number as one token, which it learns
# in a few hundred SFT steps; digit by digit it had not learned to copy after 800.
TINY_NUMBER_TOKENS = 1000
BUILTIN_TOKENIZERS = {"qwen2.5": "qwen2.5", "llama3": "llama3.1"}   # config.tokenizer.builtin


def tiny_tokenizer_dir(workdir, function_calling: bool = False):
    """Where a tiny-model run in `workdir` builds its tokenizer, and a later reader finds it."""
    return paths.as_path(workdir) / ("tokenizer_fc" if function_calling else "tokenizer")


def tokenizer_source(config, function_calling: bool = False) -> str:
    """Where `tokenizer_from_config` takes the tokenizer from, said for a message."""
    if config.tokenizer.path:
        return str(config.tokenizer.path)
    if config.model.tiny:
        return str(tiny_tokenizer_dir(config.workdir, function_calling))
    return f"the built-in {config.tokenizer.builtin} tokenizer"


def tokenizer_from_config(config, training_texts: Callable[[], Sequence[str]], *,
                          function_calling: bool = False, entities: Sequence[str] = ()):
    """The run's tokenizer: `config.tokenizer.path`; for the tiny model a BPE trained once on
    `training_texts()` into the workdir (function calling: Qwen2.5's template, `entities` as
    single tokens); else the built-in Qwen2.5 / Llama-3.1 tokenizer, built offline."""
    if config.tokenizer.path:
        return load_tokenizer(config.tokenizer.path)
    if not config.model.tiny:
        return load_tokenizer(cached_tokenizer_dir(BUILTIN_TOKENIZERS[config.tokenizer.builtin]))
    out = tiny_tokenizer_dir(config.workdir, function_calling)
    if not (out / "tokenizer.json").exists():
        with paths.staged(out) as local:
            if function_calling:
                build_tiny_fc_tokenizer(training_texts(), local, entities=entities)
            else:
                build_tiny_tokenizer(training_texts(), local, word_split=False, number_tokens=TINY_NUMBER_TOKENS)
    return load_tokenizer(out)


def _config_class(path: Path) -> str | None:
    try:
        return json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


def encode_chat(tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
    """Prompt ids for `messages` rendered by the tokenizer's own chat template.

    The template already writes BOS where the family wants it, so no special tokens are
    added on top (transformers' apply_chat_template does the same).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat_template")
    out = tokenizer.apply_chat_template(
        list(messages), tools=list(tools) if tools else None, tokenize=True,
        add_generation_prompt=add_generation_prompt, return_dict=False, **template_kwargs)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(i) for i in out]


def render_chat(tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
    """The prompt text `encode_chat` tokenises (for logs and debugging only)."""
    return tokenizer.apply_chat_template(
        list(messages), tools=list(tools) if tools else None, tokenize=False,
        add_generation_prompt=add_generation_prompt, **template_kwargs)


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end an assistant turn: eos plus the family's end-of-turn markers if present."""
    ids = []
    for tok in (tokenizer.eos_token, "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>",
                "<|end_of_text|>"):
        if tok is None:
            continue
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids \
                and tokenizer.convert_ids_to_tokens(tid) == tok:
            ids.append(tid)
    return ids
