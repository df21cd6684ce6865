"""Host-side stop-string detection over the exact sampled token ids.

A stop string can be split across tokens ("</py" + "thon" + ">") or sit inside one token
(">\\n" after "</python"). We never re-tokenise: each sampled token id maps to its exact bytes
(byte-level BPE pieces through the GPT-2 byte alphabet, added/special tokens through their
content), and per sequence we keep the last (longest stop - 1) bytes of the turn. For a new
token, the stop strings are searched in `tail + bytes(token)`, counting only occurrences that
end inside the new token's bytes (earlier ones would have stopped an earlier token). The
first token for which one is found is the stopping token: it is kept, everything sampled
after it is dropped. Matching is on UTF-8 bytes, so a multi-byte character split across
tokens is handled too.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

TokenBytes = Callable[[int], bytes]


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode (the alphabet byte-level BPE vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


def token_bytes_fn(tokenizer) -> TokenBytes:
    """id -> exact bytes of that token, memoised. Byte-level BPE tokenizers map exactly;
    others fall back to decoding the single id (exact for tokens that decode standalone)."""
    added = {int(i): t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    byte_level = _is_byte_level(tokenizer)
    decoder = _byte_decoder()
    memo: dict[int, bytes] = {}

    def fn(token_id: int) -> bytes:
        token_id = int(token_id)
        if token_id not in memo:
            if token_id in added:
                memo[token_id] = added[token_id].encode("utf-8")
            elif byte_level:
                piece = tokenizer.convert_ids_to_tokens(token_id) or ""
                memo[token_id] = bytes(decoder[ch] for ch in piece)
            else:
                memo[token_id] = tokenizer.decode([token_id]).encode("utf-8")
        return memo[token_id]

    return fn


class StopMatcher:
    """Incremental matcher of one sequence's turn against its stop strings."""

    def __init__(self, stops: Sequence[str], token_bytes: Optional[TokenBytes]):
        if stops and token_bytes is None:
            raise ValueError("stop strings need a tokenizer (Sampler(..., tokenizer=...) or token_bytes=...)")
        self.stops = [s.encode("utf-8") for s in stops]
        self.names = list(stops)
        self.token_bytes = token_bytes
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.tail = b""

    def feed(self, token_id: int) -> Optional[str]:
        """The stop string completed by this token, or None."""
        if not self.stops:
            return None
        piece = self.token_bytes(token_id)
        buf = self.tail + piece
        best = None
        for name, s in zip(self.names, self.stops):
            at = buf.find(s, max(0, len(self.tail) - len(s) + 1))
            if at >= 0 and (best is None or at + len(s) < best[0]):
                best = (at + len(s), name)
        self.tail = buf[max(0, len(buf) - self.keep):] if self.keep else b""
        return None if best is None else best[1]
