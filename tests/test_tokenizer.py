"""Real Qwen2.5 / Llama-3.1 tokenizers built offline from quicktok's vocabularies.

The golden id lists below were produced once and checked independently: the same chat text
encoded by `tiktoken` (a separate BPE implementation) over the same ranks and regex gives the
same ids, and they contain the published facts (<|im_start|>=151644, <|im_end|>=151645,
"\\n"=198 in Qwen; <|begin_of_text|>=128000, <|start_header_id|>=128006, <|eot_id|>=128009,
"\\n\\n"=271 in Llama-3). They are literals here so a regression in any layer shows up.
"""
import unicodedata

import pytest

from tepo_jax import builtin_tokenizers as tt
from tepo_jax.tokenizer import TokenizerLoadError, encode_chat, load_tokenizer, stop_token_ids

CHAT = [{"role": "user", "content": "What is 2+2?"}]

QWEN_GOLDEN = [  # <|im_start|>system\nYou are Qwen, ...<|im_end|>\n<|im_start|>user\n...
    151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525,
    264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 3838, 374, 220, 17, 10, 17, 30,
    151645, 198, 151644, 77091, 198]
LLAMA_GOLDEN = [  # <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting ...
    128000, 128006, 9125, 128007, 271, 38766, 1303, 33025, 2696, 25, 6790, 220, 2366, 18, 198,
    15724, 2696, 25, 220, 1627, 10263, 220, 2366, 19, 271, 128009, 128006, 882, 128007, 271,
    3923, 374, 220, 17, 10, 17, 30, 128009, 128006, 78191, 128007, 271]

TEXTS = [
    "Hello, world!", "def f(x):\n    return [i**2 for i in range(100)]  # 1+2+3==6",
    "café résumé naïve — Zürich", "cafe\u0301 (decomposed é)", "日本語のトークナイザー 中文 한국어",
    "emoji \U0001f680\U0001f525\U0001f44d mixed", "   leading\n\ttabs and  spaces   \r\n x \r\n",
    "1234567890 3.14159 0xDEADBEEF", "don't can't I'll we've 'TWAS", "Ω≈ç√∫ Икс हिन्दी",
    "<python>print(123456 * 789012)</python>\n<result>\n97408265472\n</result>",
]


@pytest.fixture(scope="session")
def qwen():
    return load_tokenizer(tt.cached_tokenizer_dir("qwen2.5"))


@pytest.fixture(scope="session")
def llama():
    return load_tokenizer(tt.cached_tokenizer_dir("llama3.1"))


def test_qwen_golden_chat_ids(qwen):
    assert encode_chat(qwen, CHAT) == QWEN_GOLDEN
    assert qwen.decode(QWEN_GOLDEN) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_llama_golden_chat_ids(llama):
    assert encode_chat(llama, CHAT) == LLAMA_GOLDEN
    assert llama.decode(LLAMA_GOLDEN).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
        "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>")


def test_special_token_ids(qwen, llama):
    assert len(qwen) == 151665 and len(llama) == 128256
    want_q = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
              "<tool_call>": 151657, "</tool_call>": 151658, "<|file_sep|>": 151664}
    want_l = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001,
              "<|finetune_right_pad_id|>": 128004, "<|start_header_id|>": 128006,
              "<|end_header_id|>": 128007, "<|eom_id|>": 128008, "<|eot_id|>": 128009,
              "<|python_tag|>": 128010, "<|reserved_special_token_247|>": 128255}
    for tok, want in ((qwen, want_q), (llama, want_l)):
        assert {t: tok.convert_tokens_to_ids(t) for t in want} == want
    assert (qwen.eos_token_id, qwen.pad_token_id, qwen.bos_token) == (151645, 151643, None)
    assert (llama.bos_token_id, llama.eos_token_id) == (128000, 128009)
    assert llama("hi")["input_ids"][0] == 128000 and qwen("hi")["input_ids"] == [6023]
    assert stop_token_ids(qwen) == [151645, 151643]
    assert stop_token_ids(llama) == [128009, 128008, 128001]
    # Qwen keeps <tool_call> when special tokens are skipped, as the released tokenizer does.
    assert qwen.decode([151657, 151644], skip_special_tokens=True) == "<tool_call>"


@pytest.mark.parametrize("family", ["qwen", "llama"])
def test_agrees_with_tiktoken_and_round_trips(family, request):
    import tiktoken

    tok = request.getfixturevalue(family)
    name, pattern, nfc = (("qwen3", tt.QWEN2_PATTERN, True) if family == "qwen"
                          else ("llama3", tt.LLAMA3_PATTERN, False))
    enc = tiktoken.Encoding(family, pat_str=pattern, mergeable_ranks=tt.read_quicktok_ranks(name),
                            special_tokens={})
    for text in TEXTS:
        norm = unicodedata.normalize("NFC", text) if nfc else text
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == enc.encode_ordinary(norm), text
        assert tok.decode(ids) == norm


def test_qwen_tools_and_tool_turns(qwen):
    tools = [{"type": "function", "function": {"name": "python", "description": "run code",
                                               "parameters": {"type": "object"}}}]
    msgs = CHAT + [
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "python", "arguments": {"code": "print(2+2)"}}}]},
        {"role": "tool", "content": "4"}]
    text = qwen.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are "
                           "a helpful assistant.\n\n# Tools\n\n")
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "python", "arguments": '
            '{"code": "print(2+2)"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n4'
            '\n</tool_response><|im_end|>\n<|im_start|>assistant\n') in text
    ids = encode_chat(qwen, msgs, tools=tools)
    # twice in the system text ("<tool_call></tool_call> XML tags:\n<tool_call>"), once the call
    assert ids.count(151657) == 3 and ids[-3:] == [151644, 77091, 198]


def test_llama_tools_render(llama):
    tools = [{"type": "function", "function": {"name": "search", "parameters": {}}}]
    text = llama.apply_chat_template(CHAT, tools=tools, tokenize=False, add_generation_prompt=True)
    assert "Environment: ipython\nCutting Knowledge Date" in text
    assert "Given the following functions" in text and text.endswith(
        "What is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_wrong_path_is_one_line_error(tmp_path):
    with pytest.raises(TokenizerLoadError, match="tokenizer directory not found") as e:
        load_tokenizer(tmp_path / "nope")
    assert "\n" not in str(e.value)
    with pytest.raises(TokenizerLoadError, match="no tokenizer files in") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError, match="cannot load tokenizer") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)


def test_cache_reuses_built_directory():
    d1 = tt.cached_tokenizer_dir("qwen2.5")
    assert tt.cached_tokenizer_dir("qwen2.5") == d1 and (d1 / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="unknown test tokenizer"):
        tt.cached_tokenizer_dir("gpt2")


def test_exported_tiny_tokenizer_reloads_with_its_own_pre_tokenizer(tmp_path):
    """Saved next to a qwen2 config.json (as the driver's sft_final export is), a tokenizer
    whose class is the generic one must reload with the pre-tokenizer it was trained with;
    AutoTokenizer alone would pick Qwen2Tokenizer and split the text differently."""
    import jax
    from tepo_jax.checkpoints.hf import save_hf
    from tepo_jax.models.config import ModelConfig
    from tepo_jax.sharding import MeshConfig, create_sharded_model, make_mesh
    from tepo_jax.tiny_tokenizer import build_tiny_fc_tokenizer

    text = 'I need get_weather.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    src = build_tiny_fc_tokenizer([text] * 20, tmp_path / "tok", vocab_size=400)
    tok = load_tokenizer(src)
    cfg = ModelConfig(family="qwen2", vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, qkv_bias=True,
                      tie_word_embeddings=True)
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    out = tmp_path / "export"
    save_hf(create_sharded_model(cfg, mesh, seed=0), str(out))
    tok.save_pretrained(str(out))
    reloaded = load_tokenizer(out)
    assert reloaded.encode(text) == tok.encode(text)
    assert len(reloaded.encode(text)) < 20  # merged across words, as trained


def test_tiny_tokenizer_numbers_are_single_tokens(tmp_path):
    """number_tokens=1000: 0…999 are one token each and longer digit runs split from the left
    into such chunks (as Llama 3 does), so the demo's model copies a number as one token."""
    from tepo_jax.tiny_tokenizer import build_tiny_tokenizer
    texts = ["Compute `47 * 14`. Roughly 700. Checking.", "Crate 650 weighs 17 kg."] * 30
    tok = load_tokenizer(build_tiny_tokenizer(texts, tmp_path / "t", vocab_size=300, word_split=False,
                                              number_tokens=1000))
    for n in ("0", "7", "17", "650", "999"):
        assert tok.tokenize(n) == [n]
    assert tok.tokenize("4042") == ["404", "2"] and tok.tokenize("1234567") == ["123", "456", "7"]
    text = "print(47 * 14) gives 658, crate 007 weighs 1234 kg"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert len(tok) > 1000
