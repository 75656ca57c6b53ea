"""Byte-level BPE from a GGUF vocabulary: text <-> token ids, for `hyprof generate --prompt`.

GPT-2 style: UTF-8 bytes are spelled as printable characters, then adjacent
pairs are merged lowest rank first (`tokenizer.ggml.merges`). There is no
pre-tokenizer regex split, so a real model's vocabulary may split text
differently from llama.cpp at word boundaries; for the made models, whose merges
never cross a space, it is the same. BOS is prepended when the file names one.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def byte_chars() -> tuple[str, ...]:
    """GPT-2's byte-to-unicode table: byte b is spelled as this printable character."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | \
        set(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return tuple(chars)


class Tokenizer:
    def __init__(self, tokens: list[str], merges: list[str] | None, bos_id: int | None = None,
                 token_types: list[int] | None = None):
        self.tokens, self.bos_id = tokens, bos_id
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges or [])}
        self.control = {i for i, t in enumerate(token_types or []) if t == 3}
        self.char_byte = {c: b for b, c in enumerate(byte_chars())}

    @classmethod
    def from_gguf(cls, gguf) -> "Tokenizer | None":
        if not gguf.vocab:
            return None
        return cls(gguf.vocab, gguf.merges, gguf.bos_id, gguf.token_types)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        chars = byte_chars()
        parts = [chars[b] for b in text.encode("utf-8")]
        while len(parts) > 1:
            ranked = [(self.ranks.get((a, b), len(self.ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(ranked)
            if rank == len(self.ranks):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids = [self.ids[p] for p in parts]
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.tokens[i] for i in ids if i not in self.control)
        return bytes(self.char_byte.get(c, ord("?")) for c in text).decode("utf-8", errors="replace")
