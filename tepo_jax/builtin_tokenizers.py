"""Real Qwen2.5 and Llama-3.1 tokenizer directories, built offline.

No model hub is reachable from our machines, so tests build the two tokenizers from the BPE
vocabularies shipped in the `quicktok-v1` wheel (`quicktok/data/{qwen3,llama3}.{vocab,special}`):
ranks -> tiktoken file -> transformers' `TikTokenConverter` (vocab + merges) -> tokenizer.json,
plus the families' special tokens with their real ids, the published chat templates and a
tokenizer_config.json. The result loads with `transformers.AutoTokenizer.from_pretrained`.

Building takes a few seconds per family (merges are derived from 150k ranks), so
`cached_tokenizer_dir(name)` builds once into a temp cache keyed by name and format version.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

from tepo_jax.chat_templates import LLAMA31_CHAT_TEMPLATE, QWEN25_CHAT_TEMPLATE

# Pre-tokenizer regexes of the two families (as in their tokenizer.json Split nodes).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

QWEN25_VOCAB_SIZE = 151665      # len(tokenizer): 151643 BPE ranks + 22 added tokens
LLAMA3_VOCAB_SIZE = 128256      # 128000 BPE ranks + 256 special tokens
# Qwen2.5 marks these added tokens special=False (they survive skip_special_tokens).
_QWEN_NON_SPECIAL = {"<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                     "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"}
_LLAMA31_NAMED = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>",
                  128002: "<|reserved_special_token_0|>", 128003: "<|reserved_special_token_1|>",
                  128004: "<|finetune_right_pad_id|>", 128005: "<|reserved_special_token_2|>",
                  128006: "<|start_header_id|>", 128007: "<|end_header_id|>",
                  128008: "<|eom_id|>", 128009: "<|eot_id|>", 128010: "<|python_tag|>"}
_FORMAT_VERSION = "3"           # bump when the built files change


def quicktok_data_dir() -> Path:
    try:
        import quicktok  # noqa: F401  (only its data files are used)
    except ImportError as e:  # pragma: no cover - exercised only without the test extra
        raise RuntimeError("building test tokenizers needs `pip install quicktok-v1`") from e
    return Path(quicktok.__file__).parent / "data"


def read_quicktok_ranks(name: str) -> dict[bytes, int]:
    """`<name>.vocab`: u32 count, then per token u16 length, raw bytes, u32 rank."""
    buf = (quicktok_data_dir() / f"{name}.vocab").read_bytes()
    (count,), off, ranks = struct.unpack_from("<I", buf, 0), 4, {}
    for _ in range(count):
        (n,) = struct.unpack_from("<H", buf, off)
        raw = buf[off + 2: off + 2 + n]
        (rank,) = struct.unpack_from("<I", buf, off + 2 + n)
        ranks[raw] = rank
        off += 6 + n
    return ranks


def read_quicktok_specials(name: str) -> dict[int, str]:
    """`<name>.special`: u32 count, then per token u32 id, u16 length, utf-8 bytes."""
    buf = (quicktok_data_dir() / f"{name}.special").read_bytes()
    (count,), off, specials = struct.unpack_from("<I", buf, 0), 4, {}
    for _ in range(count):
        tid, n = struct.unpack_from("<IH", buf, off)
        specials[tid] = buf[off + 6: off + 6 + n].decode("utf-8")
        off += 6 + n
    return specials


def qwen25_special_tokens() -> dict[int, str]:
    """Qwen2.5's 22 added tokens (151643..151664); Qwen3's extra ones are dropped."""
    sp = read_quicktok_specials("qwen3")
    return {i: sp[i] for i in range(151643, QWEN25_VOCAB_SIZE)}


def llama31_special_tokens() -> dict[int, str]:
    """Llama-3.1 names for ids 128000..128255 (3.1 renamed a few of Llama-3's reserved ids)."""
    out = dict(_LLAMA31_NAMED)
    for tid in range(128011, LLAMA3_VOCAB_SIZE):
        out[tid] = f"<|reserved_special_token_{tid - 128011 + 3}|>"
    return out


def _write_tiktoken_file(ranks: dict[bytes, int], path: Path) -> None:
    lines = (f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in
             sorted(ranks.items(), key=lambda kv: kv[1]))
    path.write_text("\n".join(lines) + "\n")


def _backend(ranks, specials, pattern, non_special, nfc, bos_id):
    """A `tokenizers.Tokenizer`: byte-level BPE + added tokens with exact ids."""
    from tokenizers import AddedToken, normalizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ranks.tiktoken"
        _write_tiktoken_file(ranks, path)
        tok = TikTokenConverter(vocab_file=str(path), pattern=pattern).converted()
    # add_special_tokens appends ids in order, so the ids must be contiguous after the ranks.
    assert sorted(specials) == list(range(len(ranks), len(ranks) + len(specials)))
    for tid in sorted(specials):
        content = specials[tid]
        if content in non_special:   # add_special_tokens would force special=True
            tok.add_tokens([AddedToken(content, special=False, normalized=False)])
        else:
            tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        assert tok.token_to_id(content) == tid, (content, tid)
    if nfc:
        tok.normalizer = normalizers.NFC()
    if bos_id is not None:
        bos = specials[bos_id]
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos}:0 $A:0",
                                          pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                          special_tokens=[(bos, bos_id)])])
    return tok


def _write_dir(out_dir, tok, config: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return out


def build_qwen25_tokenizer(out_dir) -> Path:
    """Writes a Qwen2.5-Instruct tokenizer directory (tokenizer.json + tokenizer_config.json)."""
    specials = qwen25_special_tokens()
    tok = _backend(read_quicktok_ranks("qwen3"), specials, QWEN2_PATTERN, _QWEN_NON_SPECIAL,
                   nfc=True, bos_id=None)
    extra = [s for i, s in sorted(specials.items())
             if s not in _QWEN_NON_SPECIAL and s != "<|endoftext|>"]
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "errors": "replace", "split_special_tokens": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 131072,
        "additional_special_tokens": extra, "chat_template": QWEN25_CHAT_TEMPLATE,
    }
    return _write_dir(out_dir, tok, config)


def build_llama3_tokenizer(out_dir) -> Path:
    """Writes a Llama-3.1-Instruct tokenizer directory (BOS added by the post-processor)."""
    tok = _backend(read_quicktok_ranks("llama3"), llama31_special_tokens(), LLAMA3_PATTERN,
                   set(), nfc=False, bos_id=128000)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>",
        # the published file says True; transformers 5 ignores it for BPE (and warns), so False
        "clean_up_tokenization_spaces": False, "model_max_length": 131072,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": LLAMA31_CHAT_TEMPLATE,
    }
    return _write_dir(out_dir, tok, config)


BUILDERS = {"qwen2.5": build_qwen25_tokenizer, "llama3.1": build_llama3_tokenizer}


def cache_root() -> Path:
    return Path(os.environ.get("TEPO_JAX_CACHE", Path(tempfile.gettempdir()) / "tepo_jax_cache"))


def cached_tokenizer_dir(name: str) -> Path:
    """Builds `name` ('qwen2.5' | 'llama3.1') once into the cache and returns its directory."""
    if name not in BUILDERS:
        raise ValueError(f"unknown test tokenizer {name!r}; known: {sorted(BUILDERS)}")
    final = cache_root() / "tokenizers" / f"{name}-v{_FORMAT_VERSION}"
    if (final / "tokenizer_config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    BUILDERS[name](tmp)
    try:
        os.rename(tmp, final)          # atomic: concurrent builders race harmlessly
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
