"""A small real BPE tokenizer for the CPU demo, trained on the demo's own text.

The demo's tiny model cannot afford Qwen's 151k-entry vocabulary on two CPU cores, so
`make demo` trains a byte-level BPE (HF `tokenizers`) of about a thousand entries on the
synthetic task texts and saves it as an ordinary HF tokenizer directory (tokenizer.json,
tokenizer_config.json with a ChatML chat template), loaded like any other through
`tepo_jax.tokenizer.load_tokenizer`. Digits are split one per token so numbers can be copied
digit by digit; the tool tags are single tokens so the tiny model learns the format quickly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAG_TOKENS = ["<python>", "</python>", "<search>", "</search>", "<result>", "</result>",
              "<answer>", "</answer>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024) -> Path:
    """Train a byte-level BPE on `texts` and save an HF tokenizer directory to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_tokens(TAG_TOKENS)  # ordinary (non-special) tokens: they decode as text
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = CHATML_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    (out / "tiny_tokenizer.json").write_text(json.dumps({"vocab_size": len(fast), "trained_on": "synthetic"}))
    return out
