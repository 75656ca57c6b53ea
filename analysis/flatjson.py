"""A vectorised reader for JSON lines that are flat objects, the shape every timings writer produces.

    parse_flat_lines(buf, n_lines, int_fields, str_fields) -> FlatColumns | None

`buf` is `n_lines` lines, each ending in b"\\n", each one JSON object whose values
are strings or numbers (`{"type":"op","ts":5,"name":"blk.0.ffn_up_exps"}`).
Instead of building a dict per line (a microsecond each, more than the whole
report may spend), the bytes are scanned with NumPy: quote positions give the
strings, the byte after a closing quote says key (`:`) or value, and keys and
values are paired by their order. Whitespace outside strings is removed first.

Anything outside that shape (escapes, nesting, arrays, null, booleans or
fractions in the wanted fields, commas or colons inside strings, keys longer
than 8 bytes for wanted fields, strings over 64 bytes) returns None, and the
caller parses those lines with a real JSON parser, which also words the
errors. So this is only ever a faster route to the same columns.

String values of the wanted fields are returned as ids into a list of unique
byte strings, found through a 64-bit hash of their bytes and length (a
collision between two distinct names, about 2**-64 per pair, is not checked).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_QUOTE, _COLON, _COMMA, _OPEN, _CLOSE, _NL = b'"', b":", b",", b"{", b"}", b"\n"
_MAX_INT_DIGITS = 18
_MAX_STRING = 64
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[32, 9, 13]] = True


@dataclass(frozen=True)
class FlatColumns:
    ints: dict          # field -> (values int64 per line, 0 where absent; keyed bool per line)
    strs: dict          # field -> (id per line into `strings`, -1 where absent)
    strings: list       # unique byte strings
    other_keys: tuple   # (line index per other key, name id per other key, names: list[bytes])


def _pack(names: tuple) -> np.ndarray:
    return np.array([int.from_bytes(n.encode(), "little") for n in names], dtype=np.uint64)


def _gather(a: np.ndarray, start: np.ndarray, length: np.ndarray, width: int) -> np.ndarray:
    """Rows of `width` bytes from each start, zero past each length."""
    cols = np.arange(width)
    rows = a[np.minimum(start[:, None] + cols, a.size - 1)]
    rows[cols >= length[:, None]] = 0
    return rows


def _without_whitespace(a: np.ndarray) -> np.ndarray:
    """Drop spaces, tabs and CRs outside strings (a quote's parity says inside or out)."""
    inside = (np.cumsum(a == 34) & 1).astype(bool)
    return a[~(_WHITESPACE[a] & ~inside)]


def parse_flat_lines(buf: bytes, n_lines: int, int_fields: tuple, str_fields: tuple) -> FlatColumns | None:
    if n_lines == 0 or b"\\" in buf or b"[" in buf or buf.count(_OPEN) != n_lines or buf.count(_CLOSE) != n_lines:
        return None
    a = np.frombuffer(buf, dtype=np.uint8)
    if b" " in buf or b"\t" in buf or b"\r" in buf:
        a = _without_whitespace(a)
    q = np.flatnonzero(a == 34)
    nl = np.flatnonzero(a == 10)
    if q.size % 2 or nl.size != n_lines or a[-1] != 10:
        return None
    line_start = np.r_[0, nl[:-1] + 1]
    if (a[line_start] != 123).any() or (a[nl - 1] != 125).any():
        return None
    o, c = q[0::2], q[1::2]                       # string i spans o[i]+1 .. c[i]
    n_str = o.size
    after = a[c + 1]
    is_key = after == 58
    if not (is_key | (after == 44) | (after == 125)).all():
        return None
    first = a[o - 1] == 123
    if int(first.sum()) != n_lines or not is_key[first].all():
        return None
    line = np.cumsum(first) - 1                   # line of each string
    keys = np.flatnonzero(is_key)
    n_keys = keys.size
    # one colon per key, a comma between keys: no stray ones inside strings or numbers
    if buf.count(_COLON) != n_keys or buf.count(_COMMA) != n_keys - n_lines:
        return None
    if (a[o[keys] - 1] != np.where(first[keys], 123, 44)).any():
        return None
    v0 = c[keys] + 2
    v_str = a[v0] == 34
    s_keys = keys[v_str]
    if s_keys.size and (s_keys[-1] + 1 >= n_str or (o[s_keys + 1] != v0[v_str]).any() or is_key[s_keys + 1].any()):
        return None
    if s_keys.size + n_keys != n_str:
        return None                               # every string is a key or the value of one
    n_keys_ = keys[~v_str]
    nxt = np.minimum(n_keys_ + 1, n_str - 1)
    last = (n_keys_ + 1 >= n_str) | (line[nxt] != line[n_keys_])
    tok_end = np.where(last, nl[line[n_keys_]] - 1, o[nxt] - 1)
    tok_start = v0[~v_str]

    # keys: names of up to 8 bytes packed into an integer; longer ones are none of ours
    key_len = c[keys] - o[keys] - 1
    key_pack = _gather(a, o[keys] + 1, key_len, 8).view("<u8").reshape(-1)
    key_pack[key_len > 8] = 0
    wanted = int_fields + str_fields
    packs = _pack(wanted)
    order = np.argsort(packs)
    pos = np.minimum(np.searchsorted(packs[order], key_pack), len(wanted) - 1)
    field = np.where(packs[order][pos] == key_pack, order[pos], -1)
    key_line = line[keys]

    out_ints, out_strs = {}, {}
    scalar_field, string_field = field[~v_str], field[v_str]
    for f, name in enumerate(int_fields):
        sel = scalar_field == f
        if (string_field == f).any():
            return None
        values = np.zeros(n_lines, dtype=np.int64)
        keyed = np.zeros(n_lines, dtype=bool)
        if sel.any():
            parsed = _parse_ints(a, tok_start[sel], tok_end[sel] - tok_start[sel])
            if parsed is None:
                return None
            rows = key_line[~v_str][sel]
            values[rows], keyed[rows] = parsed, True
        out_ints[name] = (values, keyed)

    str_sel = (string_field >= len(int_fields))
    if (scalar_field >= len(int_fields)).any():
        return None
    val_idx = s_keys[str_sel] + 1
    ids, strings = _intern(a, o[val_idx] + 1, c[val_idx] - o[val_idx] - 1)
    if ids is None:
        return None
    rows, fields = key_line[v_str][str_sel], string_field[str_sel]
    for f, name in enumerate(str_fields, start=len(int_fields)):
        col = np.full(n_lines, -1, dtype=np.int64)
        mine = fields == f
        col[rows[mine]] = ids[mine]
        out_strs[name] = col

    other = field < 0
    other_names, other_ids = [], np.empty(0, dtype=np.int64)
    if other.any():
        starts, ends = o[keys][other] + 1, c[keys][other]
        raw = [a[s:e].tobytes() for s, e in zip(starts, ends)]
        table = {}
        other_ids = np.array([table.setdefault(r, len(table)) for r in raw], dtype=np.int64)
        other_names = list(table)
    return FlatColumns(out_ints, out_strs, strings, (key_line[other], other_ids, other_names))


def _parse_ints(a: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray | None:
    """Decimal integers (optional minus sign), or None if any token is something else."""
    if length.size == 0:
        return np.zeros(0, dtype=np.int64)
    if length.min() < 1 or length.max() > _MAX_INT_DIGITS:
        return None
    width = int(length.max())
    rows = _gather(a, start, length, width)
    negative = rows[:, 0] == 45
    value = np.zeros(start.size, dtype=np.int64)
    for j in range(width):
        digit = rows[:, j].astype(np.int64) - 48
        used = (j < length) & ~((j == 0) & negative)
        if ((digit < 0) | (digit > 9))[used].any():
            return None
        value = np.where(used, value * 10 + digit, value)
    if (negative & (length < 2)).any():
        return None
    return np.where(negative, -value, value)


_MIX = np.uint64(0x9E3779B97F4A7C15)


def _intern(a: np.ndarray, start: np.ndarray, length: np.ndarray) -> tuple[np.ndarray | None, list]:
    """Ids of equal byte strings, and the unique strings in id order."""
    if length.size == 0:
        return np.zeros(0, dtype=np.int64), []
    if length.max() > _MAX_STRING:
        return None, []
    width = max(8, -(-int(length.max()) // 8) * 8)
    words = _gather(a, start, length, width).view("<u8")
    h = length.astype(np.uint64) * _MIX
    for k in range(words.shape[1]):
        h = (h ^ words[:, k]) * _MIX
        h ^= h >> np.uint64(29)
    uniq, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    strings = [a[s:s + n].tobytes() for s, n in zip(start[first], length[first])]
    return inverse.reshape(-1), strings
