"""A small real BPE tokenizer for the CPU demo, trained on the demo's own text.

The demo's tiny model cannot afford Qwen's 151k-entry vocabulary on two CPU cores, so
`make demo` trains a byte-level BPE (HF `tokenizers`) of about a thousand entries on the
synthetic task texts and saves it as an ordinary HF tokenizer directory (tokenizer.json,
tokenizer_config.json with a ChatML chat template), loaded like any other through
`tepo_jax.tokenizer.load_tokenizer`. Digits are split one per token so numbers can be copied
digit by digit; the tool tags are single tokens so the tiny model learns the format quickly.

`build_tiny_fc_tokenizer` is the function-calling variant: the same BPE, but its chat template
is the real Qwen2.5-Instruct template (`tepo_jax.chat_templates`), which writes the
tool schemas into the system message and renders assistant tool calls and tool responses the
Qwen2.5 way, and `<tool_call>`, `</tool_call>` (and the response/schema tags) are single added
tokens. Its BPE merges across word boundaries (no pre-tokenizer regex; digits still one per
token): the five tool schemas in every prompt then shrink from ~800 tokens to ~100, and the JSON
scaffolding of a call (`", "to_currency": "`) to a few tokens, which keeps the CPU demo's
sequences short. The argument values the model has to copy (`entities`: city names,
currencies, ...) are added as single tokens, so a value is the same token in the question, the
schema, the call and the result — the tiny model copies it like a digit instead of learning a
different merge for every context. `render_template` renders a conversation through a template without a trained
vocabulary, so the BPE can be trained on exactly the text the template will produce.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from tepo_jax.chat_templates import QWEN25_CHAT_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAG_TOKENS = ["<python>", "</python>", "<search>", "</search>", "<result>", "</result>",
              "<answer>", "</answer>"]
FC_TAG_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                 "<tools>", "</tools>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1024,
                         word_split: bool = True, number_tokens: int = 0) -> Path:
    """Train a byte-level BPE on `texts` and save an HF tokenizer directory to `out_dir`.
    `word_split=False` lets merges cross word boundaries. Digits are one per token, unless
    `number_tokens=N`: then the numbers 0 … N-1 are tokens of their own, and longer digit runs
    split from the left into such numbers (N=1000: Llama 3's chunks of up to three digits)."""
    numbers = [str(i) for i in range(number_tokens)]
    return _build(texts, out_dir, vocab_size, TAG_TOKENS + numbers, CHATML_TEMPLATE, "synthetic",
                  word_split=word_split)


def build_tiny_fc_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 2048,
                            entities: Sequence[str] = ()) -> Path:
    """The function-calling variant: Qwen2.5's chat template (tools in the system message,
    `<tool_call>` calls, `<tool_response>` results), the call tags and `entities` as single
    tokens, merges across words."""
    added = FC_TAG_TOKENS + sorted(set(entities) - set(FC_TAG_TOKENS))
    return _build(texts, out_dir, vocab_size, added, QWEN25_CHAT_TEMPLATE, "function_calling",
                  word_split=False)


def render_template(template: str, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                    add_generation_prompt: bool = False) -> str:
    """`messages` rendered by `template` as transformers renders it (no vocabulary needed)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token="<|im_end|>")
    fast.chat_template = template
    return fast.apply_chat_template(list(messages), tools=list(tools) if tools else None,
                                    tokenize=False, add_generation_prompt=add_generation_prompt)


def _build(texts: Iterable[str], out_dir: str | Path, vocab_size: int, added: Sequence[str],
           template: str, trained_on: str, word_split: bool = True) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=word_split),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_tokens(list(added))  # ordinary (non-special) tokens: they decode as text
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = template
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    (out / "tiny_tokenizer.json").write_text(json.dumps({"vocab_size": len(fast), "trained_on": trained_on}))
    return out
