r"""transformers' CLIP normalization and regex character classes, as data openvino-tokenizers' ops take.

1. NFC + lowercase as a sentencepiece "precompiled charsmap" for the CharsMapNormalization op.
openvino-tokenizers builds that op's map with sentencepiece from ICU: NFC only composes the canonical
decomposition of a single char, and CaseFold is Unicode *simple case folding* (µ -> μ, ſ -> s, ς -> σ,
Cherokee small -> capital letters, İ unchanged: 250 chars) where `tokenizers` lowercases each char (µ, ſ, ς
kept, İ -> i̇). This map is generated from the `tokenizers` normalizers themselves. The op replaces the longest
matching key at each position and copies a char that matches none. Keys: every char that changes, every
canonical decomposition (NFD text), Hangul LV syllable + trailing jamo, and char + mark pairs whose NFC the
shorter keys get wrong (a mark added to a precomposed letter: "é" + U+0323 -> "ẹ" + U+0301).
Not expressible by such a map: NFC of two or more marks that canonical ordering moves past each other, or a
mark composing with the letter past another mark ("e\u0301\u0323", zalgo text). Those keep their order.

2. \p{L}, \p{N}, \s as explicit code point ranges. transformers' pre-tokenizer regexes run on Oniguruma with the
Unicode tables of the `tokenizers` build; openvino-tokenizers' regex engine has other ones: 4644 letters and
13 digits of Unicode 16/17 (Garay, Sidetic, Tangut supplement, CJK extension J, ...) are punctuation for
transformers, and U+180E MONGOLIAN VOWEL SEPARATOR (whitespace before Unicode 6.3) was dropped as whitespace.

Both tables take ~10 s to build (a pass over every code point); they depend only on this module, the `tokenizers`
version and Python's Unicode tables, so they are kept in the user's cache (`_stored`) between conversions.
"""

import hashlib
import json
import os
import struct
import unicodedata
from functools import lru_cache
from pathlib import Path

MAX_UNITS = 1 << 21  # darts-clone stores offsets < 2**21 directly


def _double_array(keys: dict[bytes, int]) -> list[int]:
    """darts-clone double array (ref: darts-clone darts.h DoubleArrayUnit, commonPrefixSearch)."""
    root: dict = {}
    for key, value in keys.items():
        node = root
        for byte in key:
            node = node.setdefault(byte, {})
        node[None] = value
    units = [0] * 256
    free = bytearray(b"\x01" * 256)
    free[0] = 0  # the root unit
    first_free = 1
    stack = [(0, root)]
    while stack:
        pos, node = stack.pop()
        labels = sorted(k for k in node if k is not None)
        base = first_free
        while True:  # base^0 = base holds the leaf value (or a guard), base^label the children
            if base >= len(units):
                units += [0] * 256
                free += b"\x01" * 256
            if free[base] and all(free[base ^ c] for c in labels):
                break
            base += 1
        assert (pos ^ base) < MAX_UNITS, "charsmap too large for direct darts-clone offsets"
        units[pos] |= (pos ^ base) << 10 | (None in node) << 8
        units[base] = 1 << 31 | node.get(None, 0)  # label() has bit 31: never equals an input byte (NUL too)
        free[base] = 0
        for c in labels:
            units[base ^ c] = c
            free[base ^ c] = 0
            stack.append((base ^ c, node[c]))
        while first_free < len(free) and not free[first_free]:
            first_free += 1
    return units


def compile_charsmap(mapping: dict[str, str]) -> bytes:
    """<uint32 trie bytes><double array><NUL-terminated values> (ref: sentencepiece normalizer.cc)."""
    blob, offsets, keys = bytearray(), {}, {}
    for key, value in mapping.items():
        if value not in offsets:
            offsets[value] = len(blob)
            blob += value.encode() + b"\x00"
        keys[key.encode()] = offsets[value]
    units = _double_array(keys)
    return struct.pack("<I", 4 * len(units)) + struct.pack(f"<{len(units)}I", *units) + bytes(blob)


def _greedy(mapping: dict[str, str], text: str, max_len: int) -> str:
    """What the op outputs for `text` with this map."""
    out, i = [], 0
    while i < len(text):
        for n in range(min(max_len, len(text) - i), 0, -1):
            if (value := mapping.get(text[i : i + n])) is not None:
                out.append(value)
                i += n
                break
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _batched(normalize, strings: list[str]) -> list[str]:
    # "\n" neither composes nor changes case: normalize many strings in one call
    return normalize("\n".join(strings)).split("\n")


def table_dir() -> Path:
    """($XDG_CACHE_HOME or ~/.cache)/sdxl-openvino/convert: where the built tables are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdxl-openvino" / "convert"


def _stored(name: str, build) -> dict[str, str]:
    """build() kept as JSON under table_dir(), keyed by this module's source, the `tokenizers` version and
    Python's Unicode version: a change to any of them builds the table again. A missing, unreadable or damaged
    file is rebuilt; a cache that cannot be written is skipped (written under a temporary name, then renamed)."""
    import tokenizers

    key = hashlib.sha256(Path(__file__).read_bytes())
    key.update(f"{tokenizers.__version__} {unicodedata.unidata_version}".encode())
    path = table_dir() / f"{name}-{key.hexdigest()[:16]}.json"
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(table, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in table.items()):
            return table
    except (OSError, ValueError):
        pass
    table = build()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(table), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
    return table


@lru_cache(1)
def clip_normalizer_map() -> dict[str, str]:
    """key -> lowercase(NFC(key)), with the `tokenizers` normalizers that transformers runs as reference."""
    return _stored("clip_normalizer_map", _build_normalizer_map)


def _build_normalizer_map() -> dict[str, str]:
    from tokenizers import normalizers

    ref = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()]).normalize_str
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000 and c != 0x0A]  # "\n" never changes
    mapping = {c: v for c, v in zip(chars, _batched(ref, chars), strict=True) if v != c}
    nfd = _batched(normalizers.NFD().normalize_str, chars)
    decomposed = {c: d for c, d in zip(chars, nfd, strict=True) if d != c}
    keys = sorted(set(decomposed.values()))
    # Hangul: an LV syllable + a trailing consonant jamo composes to an LVT syllable
    keys += [chr(0xAC00 + 28 * i) + chr(t) for i in range(19 * 21) for t in range(0x11A8, 0x11C3)]
    mapping.update(zip(keys, _batched(ref, keys), strict=True))
    max_len = max(map(len, mapping))

    # a mark after a char that NFC composes with it or reorders; unicodedata (C, fast) preselects,
    # `tokenizers` decides
    marks = {c for c in chars if unicodedata.combining(c)} | {d[-1] for d in decomposed.values()}
    marks = sorted(marks | {c for c, d in decomposed.items() if unicodedata.combining(d[0])})
    starters = sorted({d[0] for d in decomposed.values()} | set(decomposed))
    nfc = unicodedata.normalize
    pairs = [
        c + m
        for c in starters
        if not 0xAC00 <= ord(c) < 0xD7A4  # Hangul done above
        for m in marks
        if nfc("NFC", c + m) != nfc("NFC", c) + nfc("NFC", m)
    ]
    for s, v in zip(pairs, _batched(ref, pairs), strict=True):
        if v != _greedy(mapping, s, max_len):
            mapping[s] = v
    return mapping


@lru_cache(1)
def clip_regex_classes() -> dict[str, str]:
    r"""\p{L}, \p{N}, \s -> their members for transformers (Oniguruma), as class ranges "\x{41}-\x{5a}..." """
    return _stored("clip_regex_classes", _build_regex_classes)


def _build_regex_classes() -> dict[str, str]:
    from tokenizers import Regex, pre_tokenizers

    chars = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    classes = {}
    for name in (r"\p{L}", r"\p{N}", r"\s"):
        runs = pre_tokenizers.Split(Regex(name + "+"), "removed", invert=True).pre_tokenize_str(chars)
        ranges = [(ord(chars[a]), ord(chars[b - 1])) for _, (a, b) in runs]
        classes[name] = "".join(rf"\x{{{a:x}}}" + (rf"-\x{{{b:x}}}" if b > a else "") for a, b in ranges)
    return classes


def explicit_classes(pattern: str) -> str:
    r"""Replace \p{L}, \p{N}, \s, \S in a regex by explicit ranges (inside or outside [...])."""
    classes = clip_regex_classes()
    not_space = f"[^{classes[chr(92) + 's']}]"
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        esc = next((e for e in (*classes, r"\S") if pattern.startswith(e, i)), None)
        if esc == r"\S":
            if in_class:
                raise NotImplementedError(f"\\S inside a class: {pattern}")
            out.append(not_space)
        elif esc:
            out.append(classes[esc] if in_class else f"[{classes[esc]}]")
        elif c == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        else:
            in_class = (c == "[") or (in_class and c != "]")
            out.append(c)
        i += len(esc) if esc else 1
    return "".join(out)
