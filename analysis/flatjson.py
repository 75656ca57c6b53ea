"""A vectorised reader for JSON lines that are flat objects, the shape every timings writer produces.

    reader = FlatReader(int_fields, str_fields, float_fields=(), int_absent=None)
    reader.parse(buf, n_lines) -> FlatColumns | None
    reader.strings              every string value seen so far; FlatColumns.strs hold ids into it
    count_lines(buf) -> int     the line breaks in buf (compiled where built)

`buf` is `n_lines` lines, each ending in b"\\n", each one JSON object whose values
are strings or numbers (`{"type":"op","ts":5,"name":"blk.0.ffn_up_exps"}`).
Instead of building a dict per line (about a microsecond each: more than the
whole report may spend per event), the bytes are scanned in one pass by the
compiled scanner `analysis._jsonl` (built by setup.py; about 0.2 µs per line of
our writer's, without the GIL), or, where it is not built or stops, with NumPy. The quote
positions give the strings; the byte after a closing quote says key (`:`) or
value; each key's value runs to the separator in front of the next key (`,`,
or `}\\n{` at a line break), and the chain of separators is checked from the
first byte to the last. Whitespace outside strings is removed first. Bytes are
read eight at a time through an unaligned uint64 view, so keys, digits and
string hashes cost a few array operations per field, not per byte.

Anything outside that shape (bytes outside ASCII, which a JSON parser must check to be UTF-8,
escapes, nesting, arrays, null, booleans or
fractions in the wanted integer fields, wanted integers over 16 digits (18 compiled), wanted
strings over 64 bytes (any length compiled)) returns None, and the caller parses those lines with a real JSON
parser, which also words the errors: this is only a faster route to the same
columns. Float fields are meant for rare values (a test's reported t/s): each
is converted on its own with `float`. Two liberties: the values of unwanted fields are skipped unread, and
string values are told apart by a 64-bit hash of their bytes and length (two
distinct names colliding, about 2**-64 per pair, is not checked; the compiled
route compares the bytes). Both routes give the same columns
(tests/test_analysis_timings.py runs its readers' tests on each).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

try:
    from analysis import _jsonl       # the compiled scanner (setup.py); without it, NumPy alone
except ImportError:
    _jsonl = None

_MIX = np.uint64(0x9E3779B97F4A7C15)
_MAX_DIGITS = 16
_MAX_STRING = 64
_PAD = bytes(32)
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[32, 9, 13]] = True
# MASK[n]: the low n bytes of a word
_MASK = np.array([(1 << (8 * n)) - 1 for n in range(9)], dtype=np.uint64)
_ZEROS = np.uint64(0x3030303030303030)
_LEADING_ZEROS = _ZEROS & _MASK[::-1]          # [n]: ASCII "0" in the low 8-n bytes
_CACHE_BITS = 18
_NUMBER = re.compile(rb"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")


@dataclass(frozen=True)
class FlatColumns:
    ints: dict          # field -> (values int64 per line, its int_absent where absent; keyed bool per line)
    strs: dict          # field -> id per line into FlatReader.strings, -1 where absent
    floats: dict        # field -> (values float64 per line, NaN where absent; keyed bool per line)
    int_table: tuple    # the ints as two [field, line] arrays (values, keyed): ints holds their rows
    str_table: np.ndarray   # the strs as one [field, line] array: strs holds its rows
    other_keys: tuple   # (line of each other key, name id, names: list of bytes)
    key_mask: np.ndarray    # uint64 per line: bit i set when the line has the reader's field i (ints, strs, floats)


def count_lines(buf) -> int:
    """The number of line breaks in buf (bytes, or any buffer: a memoryview of a mapped file)."""
    if _jsonl is not None:
        return _jsonl.count_lines(buf)
    if isinstance(buf, bytes):
        return buf.count(b"\n")
    view = memoryview(buf)
    return sum(bytes(view[i:i + (1 << 24)]).count(b"\n") for i in range(0, len(view), 1 << 24))


def _words(a: np.ndarray) -> np.ndarray:
    """w[i] = the 8 bytes a[i:i+8] as a little-endian integer (a must end in 8 spare bytes)."""
    return np.ndarray(shape=(a.size - 8,), dtype="<u8", buffer=a, strides=(1,))


def _mix(h: np.ndarray) -> np.ndarray:
    h = h * _MIX
    return h ^ (h >> np.uint64(29))


class FlatReader:
    def __init__(self, int_fields: tuple, str_fields: tuple, float_fields: tuple = (), int_absent=None):
        """int_absent: the value of each integer field where a line lacks it (default 0)."""
        self.int_fields, self.str_fields, self.float_fields = int_fields, str_fields, float_fields
        self.int_absent = np.zeros(len(int_fields), np.int64) if int_absent is None else \
            np.asarray(int_absent, np.int64)
        names = int_fields + str_fields + float_fields
        assert len(names) <= 64
        assert all(len(n.encode()) <= 8 for n in names)
        self._key_pack = np.array([int.from_bytes(n.encode(), "little") for n in names], dtype=np.uint64)
        slots = (_mix(self._key_pack) >> np.uint64(52)).astype(np.int64)
        assert len(set(slots.tolist())) == len(names), "field names share a slot"
        self._key_slot_pack = np.zeros(4096, dtype=np.uint64)
        self._key_slot_field = np.full(4096, -1, dtype=np.int64)
        self._key_slot_pack[slots], self._key_slot_field[slots] = self._key_pack, np.arange(len(names))
        self.strings: list[bytes] = []
        self._cache_hash = np.zeros(1 << _CACHE_BITS, dtype=np.uint64)
        self._cache_id = np.full(1 << _CACHE_BITS, -1, dtype=np.int64)
        self._ids: dict[int, int] = {}
        self._ids_by_bytes: dict[bytes, int] = {}     # the compiled route's (it hands back bytes)
        self._field_names = tuple(n.encode() for n in names)

    def parse(self, buf: bytes, n_lines: int) -> FlatColumns | None:
        if n_lines == 0 or not buf.isascii():
            return None
        if _jsonl is not None:
            flat = self._parse_compiled(buf, n_lines)
            if flat is not None:
                return flat
        if b"\\" in buf or b"[" in buf:
            return None
        a = np.frombuffer(buf + _PAD, dtype=np.uint8)
        if b" " in buf or b"\t" in buf or b"\r" in buf:
            a = _without_whitespace(a)
        n = a.size - len(_PAD)
        w = _words(a)
        q = np.flatnonzero(a[:n] == 34)
        if q.size % 2 or n < 2 or a[0] != 123 or a[n - 2] != 125 or a[n - 1] != 10:
            return None
        o, c = q[0::2], q[1::2]                     # string i is a[o[i]+1 : c[i]]
        n_str = o.size
        keys = np.flatnonzero(a[c + 1] == 58)       # strings followed by ":"
        ko, kc = o[keys], c[keys]
        first = a[ko - 1] == 123                    # the first key of a line
        if int(first.sum()) != n_lines or o[0] != 1:
            return None
        key_line = np.cumsum(first) - 1
        n_keys = keys.size
        v0 = kc + 2
        v_str = a[v0] == 34
        scalar = ~v_str
        s_val = keys[v_str] + 1                     # index of each string value
        if s_val.size + n_keys != n_str or (s_val.size and (s_val[-1] >= n_str or (o[s_val] != v0[v_str]).any())):
            return None                             # (then no value is a key: the counts would not add up)
        # each value ends at the separator before the next key: "," or "}\n{" at a line break
        next_first = np.append(first[1:], True)
        sep = np.append(ko[1:] - np.where(first[1:], 3, 1), n - 2)
        if (a[sep] != np.where(next_first, 125, 44)).any():
            return None
        breaks = sep[next_first]
        if (a[breaks + 1] != 10).any() or (a[breaks[:-1] + 2] != 123).any():
            return None
        if (c[s_val] + 1 != sep[v_str]).any():
            return None
        scalar_start = v0[scalar]
        scalar_len = sep[scalar] - scalar_start
        if (scalar_len < 1).any():
            return None

        key_len = kc - ko - 1
        key_pack = w[ko + 1] & _MASK[np.minimum(key_len, 8)]
        slot = (_mix(key_pack) >> np.uint64(52)).astype(np.int64)
        field = np.where((self._key_slot_pack[slot] == key_pack) & (key_len <= 8), self._key_slot_field[slot], -1)
        n_int, n_str = len(self.int_fields), len(self.str_fields)

        scalar_field, string_field = field[scalar], field[v_str]
        if (((scalar_field >= n_int) & (scalar_field < n_int + n_str)).any()
                or ((string_field >= 0) & ((string_field < n_int) | (string_field >= n_int + n_str))).any()):
            return None                             # a wanted field of the wrong kind: let JSON word it
        floats = self._floats(a, scalar_field, key_line[scalar], scalar_start, scalar_len, n_lines)
        if floats is None:
            return None
        # every wanted integer at once, scattered into one row per field
        sel = (scalar_field >= 0) & (scalar_field < n_int)
        parsed = _parse_ints(a, w, scalar_start[sel], scalar_len[sel])
        if parsed is None:
            return None
        at = scalar_field[sel] * n_lines + key_line[scalar][sel]
        values = self._absent_ints(n_lines)
        keyed = np.zeros((n_int, n_lines), dtype=bool)
        values.ravel()[at], keyed.ravel()[at] = parsed, True
        ints = {name: (values[f], keyed[f]) for f, name in enumerate(self.int_fields)}

        wanted = string_field >= n_int
        idx = s_val[wanted]
        ids = self._intern(a, w, o[idx] + 1, c[idx] - o[idx] - 1)
        if ids is None:
            return None
        rows, fields = key_line[v_str][wanted], string_field[wanted]
        table = np.full((n_str, n_lines), -1, dtype=np.int64)
        table.ravel()[(fields - n_int) * n_lines + rows] = ids
        strs = dict(zip(self.str_fields, table))

        other = field < 0
        names: dict[bytes, int] = {}
        other_ids = np.array([names.setdefault(a[s:e].tobytes(), len(names))
                              for s, e in zip((ko[other] + 1).tolist(), kc[other].tolist())], dtype=np.int64)
        key_mask = np.zeros(n_lines, np.uint64)
        np.bitwise_or.at(key_mask, key_line[~other], np.left_shift(np.uint64(1), field[~other].astype(np.uint64)))
        return FlatColumns(ints, strs, floats, int_table=(values, keyed), str_table=table,
                           other_keys=(key_line[other], other_ids, list(names)), key_mask=key_mask)

    def _absent_ints(self, n_lines: int) -> np.ndarray:
        return np.repeat(self.int_absent[:, None], n_lines, axis=1)

    def _parse_compiled(self, buf: bytes, n_lines: int) -> FlatColumns | None:
        """The same columns from the compiled scanner, which also takes whitespace, literals and
        strings of any length; None where it stops (the NumPy route, then a JSON parser, decide)."""
        n_int, n_str, n_float = len(self.int_fields), len(self.str_fields), len(self.float_fields)
        values, keyed = self._absent_ints(n_lines), np.zeros((n_int, n_lines), bool)
        table = np.full((n_str, n_lines), -1, np.int64)
        floats, float_keyed = np.full((n_float, n_lines), np.nan), np.zeros((n_float, n_lines), bool)
        key_mask = np.zeros(n_lines, np.uint64)
        found = _jsonl.scan(buf, n_lines, self._field_names, n_int, n_str, values, keyed, table, floats, float_keyed,
                            key_mask)
        if found is None:
            return None
        strings, other_lines, other_names = found
        if strings:
            ids = np.array([self._string_id(s) for s in strings] + [-1], np.int64)    # [-1]: absent stays -1
            table = ids[table]
        names: dict[bytes, int] = {}
        other_ids = np.array([names.setdefault(k, len(names)) for k in other_names], np.int64)
        return FlatColumns(ints={f: (values[i], keyed[i]) for i, f in enumerate(self.int_fields)},
                           strs=dict(zip(self.str_fields, table)),
                           floats={f: (floats[i], float_keyed[i]) for i, f in enumerate(self.float_fields)},
                           int_table=(values, keyed), str_table=table,
                           other_keys=(np.array(other_lines, np.int64), other_ids, list(names)), key_mask=key_mask)

    def _string_id(self, s: bytes) -> int:
        sid = self._ids_by_bytes.get(s)
        if sid is None:
            sid = self._ids_by_bytes[s] = len(self.strings)
            self.strings.append(s)
        return sid

    def _floats(self, a, scalar_field, line, start, length, n_lines) -> dict | None:
        """The float fields, one value at a time (they are rare); None if one is not a JSON number."""
        first = len(self.int_fields) + len(self.str_fields)
        values = np.full((len(self.float_fields), n_lines), np.nan)
        keyed = np.zeros(values.shape, dtype=bool)
        for i in np.flatnonzero(scalar_field >= first).tolist():
            text = a[start[i]:start[i] + length[i]].tobytes()
            if not _NUMBER.fullmatch(text):
                return None
            values[scalar_field[i] - first, line[i]], keyed[scalar_field[i] - first, line[i]] = float(text), True
        return {name: (values[f], keyed[f]) for f, name in enumerate(self.float_fields)}

    def _intern(self, a: np.ndarray, w: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray | None:
        """Ids of the byte strings: a direct-mapped cache of hashes answers most, a dict the rest."""
        if length.size == 0:
            return np.zeros(0, dtype=np.int64)
        if length.max() > _MAX_STRING:
            return None
        h = _mix(length.astype(np.uint64) ^ (w[start] & _MASK[np.minimum(length, 8)]))
        longer = np.flatnonzero(length > 8)
        for k in range(8, int(length.max()), 8):     # the next 8 bytes of the strings that have them
            longer = longer[length[longer] > k]
            h[longer] = _mix(h[longer] ^ (w[start[longer] + k] & _MASK[np.minimum(length[longer] - k, 8)]))
        slot = (h >> np.uint64(64 - _CACHE_BITS)).astype(np.int64)
        ids = np.where(self._cache_hash[slot] == h, self._cache_id[slot], -1)
        miss = np.flatnonzero(ids < 0)
        if miss.size:
            uniq, first, inverse = np.unique(h[miss], return_index=True, return_inverse=True)
            new_ids = np.empty(uniq.size, dtype=np.int64)
            for j, (hash_, i) in enumerate(zip(uniq.tolist(), miss[first].tolist())):
                sid = self._ids.get(hash_)
                if sid is None:
                    sid = self._ids[hash_] = len(self.strings)
                    self.strings.append(a[start[i]:start[i] + length[i]].tobytes())
                new_ids[j] = sid
            ids[miss] = new_ids[inverse.reshape(-1)]
            self._cache_hash[slot[miss]] = h[miss]
            self._cache_id[slot[miss]] = ids[miss]
        return ids


def _without_whitespace(a: np.ndarray) -> np.ndarray:
    """Drop spaces, tabs and CRs outside strings (a quote count's parity says inside or out)."""
    inside = (np.cumsum(a == 34, dtype=np.uint8) & 1).astype(bool)
    return a[~(_WHITESPACE[a] & ~inside)]


def _parse_ints(a: np.ndarray, w: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray | None:
    """Decimal integers with an optional minus sign, eight digits at a time; None if any is not one."""
    negative = a[start] == 45
    start, length = start + negative, length - negative
    if length.size == 0:
        return np.zeros(0, dtype=np.int64)
    if length.min() < 1 or length.max() > _MAX_DIGITS:
        return None
    value = _digits8(w[start + np.maximum(length - 8, 0)], np.minimum(length, 8))
    big = np.flatnonzero(length > 8)
    if value is None:
        return None
    value = value.astype(np.int64)
    if big.size:
        high = _digits8(w[start[big]], length[big] - 8)
        if high is None:
            return None
        value[big] += high.astype(np.int64) * 100_000_000
    return np.where(negative, -value, value) if negative.any() else value


def _digits8(word: np.ndarray, n: np.ndarray) -> np.ndarray | None:
    """The value of the first n (1..8) ASCII digits of each word, or None if one is not a digit."""
    x = ((word & _MASK[n]) << ((8 - n) * 8).astype(np.uint64)) | _LEADING_ZEROS[n]
    if (((x + np.uint64(0x4646464646464646)) | (x - _ZEROS)) & np.uint64(0x8080808080808080)).any():
        return None
    x = ((x & np.uint64(0x0F0F0F0F0F0F0F0F)) * np.uint64(2561)) >> np.uint64(8)        # simdjson's
    x = ((x & np.uint64(0x00FF00FF00FF00FF)) * np.uint64(6553601)) >> np.uint64(16)    # eight digits
    return ((x & np.uint64(0x0000FFFF0000FFFF)) * np.uint64(42949672960001)) >> np.uint64(32)
