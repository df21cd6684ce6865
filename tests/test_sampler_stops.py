"""Stop strings over the real Qwen2.5 tokenizer, split across tokens.

The model is a real Decoder whose weights make it a deterministic bigram chain: token
chain[i] -> chain[i+1] (one-hot embeddings, attention and MLP outputs zeroed, lm_head rows
with a large logit for the successor). So the sampled ids are known in advance, and we choose
ids whose bytes put a stop string across token boundaries, or inside a token followed by
more text.
"""
import pytest

from tepo_jax.models.decoder import Decoder
from tepo_jax.sampling import Sampler, SamplerConfig, SamplingParams, StopMatcher, token_bytes_fn
from tepo_jax import builtin_tokenizers as tt
from tepo_jax.testing.models import bigram_decoder, chains_to_successors
from tepo_jax.tokenizer import load_tokenizer

CONFIG = SamplerConfig(max_slots=2, cache_buckets=(32,), prefill_buckets=(8,), steps_per_call=16)


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer(tt.cached_tokenizer_dir("qwen2.5"))


def ids_of(tok, pieces):
    out = []
    for p in pieces:
        ids = tok.convert_tokens_to_ids([p]) if len(p) == 1 and ord(p) > 127 else \
            tok.encode(p, add_special_tokens=False)
        assert len(ids) == 1, (p, ids)
        out.append(ids[0])
    return out


def bigram_model(vocab_size: int, chains: list[list[int]]) -> Decoder:
    return bigram_decoder(vocab_size, chains_to_successors(chains), logit=10.0, family="llama")


def test_token_bytes_are_exact(qwen):
    fn = token_bytes_fn(qwen)
    text = "x = 'café'\n</python>\n日本 🚀 <|im_end|>"
    ids = qwen.encode(text, add_special_tokens=False)
    assert b"".join(fn(i) for i in ids).decode("utf-8") == text
    assert fn(qwen.convert_tokens_to_ids("Ã")) == b"\xc3"  # a lone byte of a split character


def test_matcher_finds_the_completing_token():
    m = StopMatcher(["</python>", "</search>"], lambda t: t)
    pieces = [b"x", b"</", b"py", b"thon", b">\n", b"more"]
    assert [m.feed(p) for p in pieces] == [None, None, None, None, "</python>", None]
    # An occurrence inside the tail is not reported again; the earliest-ending one wins.
    m = StopMatcher(["ab", "b!c"], lambda t: t)
    assert [m.feed(p) for p in [b"a", b"b!c"]] == [None, "ab"]
    with pytest.raises(ValueError, match="need a tokenizer"):
        StopMatcher(["x"], None)


@pytest.fixture(scope="module")
def chains(qwen):
    return {
        "python": ids_of(qwen, ["print", "(", "1", ")", "</", "py", "thon", ">\n", "Done"]),
        "accent": ids_of(qwen, ["ab", "Ã", "©", "!", "zz"]),   # 'é' split over two byte tokens
    }


@pytest.fixture(scope="module")
def sampler(qwen, chains):
    model = bigram_model(len(qwen), list(chains.values()))
    return Sampler(model, CONFIG, tokenizer=qwen)


def test_stop_string_split_across_tokens_stops_at_the_completing_token(sampler, chains, qwen):
    py, acc = chains["python"], chains["accent"]
    outs = sampler.generate([py[:1], acc[:1]], [SamplingParams(greedy=True, max_tokens=12, stop=["</python>"]),
                                                SamplingParams(max_tokens=12, stop="é!", seed=1)])
    # "</python>" = "</" + "py" + "thon" + ">" of ">\n": the stop is the ">\n" token (kept).
    assert outs[0].finish_reason == "stop_string" and outs[0].stop == "</python>"
    assert list(outs[0].tokens) == py[1:8]
    assert qwen.decode(outs[0].tokens).endswith("</python>\n")
    assert outs[0].discarded > 0  # the device ran past it; those tokens were dropped
    assert outs[1].finish_reason == "stop_string" and list(outs[1].tokens) == acc[1:4]
    assert qwen.decode(outs[1].tokens) == "é!"
    # Without the stop string the chain runs on to max_tokens.
    free = sampler.generate([py[:1]], SamplingParams(greedy=True, max_tokens=12))[0]
    assert free.finish_reason == "max_tokens" and list(free.tokens[:8]) == py[1:]


def test_stop_strings_resume_with_appended_ids(sampler, chains):
    py = chains["python"]
    slot = sampler.submit(py[:1], SamplingParams(greedy=True, max_tokens=12, stop="</python>"))
    (turn1,) = sampler.advance()
    # Stops match the turn's generated text only: ")</" would need the appended ")".
    sampler.append(slot, py[2:4], SamplingParams(greedy=True, max_tokens=12, stop=[")</", "</py"]))
    (turn2,) = sampler.advance()
    assert list(turn2.tokens) == py[4:6] and turn2.stop == "</py"
    assert sampler.sequence(slot) == py[:8] + py[2:6]
    sampler.release(slot)
