"""Prompt syntax -> weighted text fragments: plain, compel 2.5.1's and A1111's.

A parsed prompt is a conjunction: parts, each a list of segments (A1111's BREAK starts a new segment, that is a
new 77-token chunk) of (text, weight) fragments, or a Blend of such prompts; each part has a weight.
runtime.weighting turns it into compel's embeddings.

ref: compel 2.5.1 prompt_parser.PromptParser (build_parser_syntax, flatten) for "compel": where compel's
grammar accepts a prompt, the fragments and weights here are compel's. Where compel silently falls back to
literal text (an unbalanced parenthesis or quote, an operator it cannot parse) this raises a one-line
RuntimeInputError instead; .swap() and withLora() (which CompelForSDXL ignores) are refused the same way.
ref: A1111 modules/prompt_parser.parse_prompt_attention for "a1111", except that unbalanced brackets and a
weight that is not a number are errors here (A1111 closes brackets at the end and reads `:x)` as text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from runtime.errors import RuntimeInputError

SYNTAXES = ("plain", "compel", "a1111")

Fragment = tuple[str, float]
Segments = list[list[Fragment]]  # a flattened prompt: segments (BREAK-separated) of fragments


@dataclass
class Blend:
    """compel's `("a", "b").blend(w1, w2)`: a weighted sum of the prompts' embeddings."""

    prompts: list[Segments]
    weights: list[float]
    normalize: bool = True


@dataclass
class Parsed:
    parts: list = field(default_factory=list)  # Segments | Blend
    weights: list[float] = field(default_factory=list)  # one per part (compel's .and() weights)


class PromptSyntaxError(RuntimeInputError):
    pass


def _error(prompt: str, why: str) -> PromptSyntaxError:
    shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    return PromptSyntaxError(f"prompt {shown!r}: {why}")


def parse(prompt: str, syntax: str) -> Parsed:
    if syntax == "compel":
        return parse_compel(prompt)
    if syntax == "a1111":
        from runtime.prompt_a1111 import parse_a1111

        return parse_a1111(prompt)
    if syntax == "plain":
        return Parsed([[[(prompt, 1.0)]]], [1.0])
    raise RuntimeInputError(f"prompt_syntax={syntax!r}: choose one of {', '.join(SYNTAXES)}")


# ---------------------------------------------------------------------------------------------------- compel
_SYNTACTIC = '()",.+-='
_ESCAPES = ("\\(", "\\)", '\\"', "\\,", "\\.", "\\+", "\\-", "\\=")
_PP_WHITE = " \t\r\n"  # pyparsing's default whitespace (White(), skipping)
_REAL = re.compile(r"\d+\.\d*|\.\d+|\d+")  # pyparsing_common.real | Word(nums) (signs go to Word('+'/'-'))
_OPTION_NUMBER = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)|-?\d+")


class _NoMatch(Exception):
    """backtracking inside the parser (never leaves this module)"""


def _frag(text: str) -> tuple:
    """compel's Fragment(): its escapes \\( \\) \\" become the characters."""
    return ("f", text.replace("\\(", "(").replace("\\)", ")").replace('\\"', '"'))


def _skip(s: str, i: int) -> int:
    while i < len(s) and s[i] in _PP_WHITE:
        i += 1
    return i


def _word_end(s: str, i: int) -> int:
    """compel's non_syntax_word: escapes, '+'/'-' followed by a plain character, any other non-syntax char."""
    j = i
    while j < len(s):
        if s[j : j + 2] in _ESCAPES:
            j += 2
        elif s[j] in "+-":
            nxt = s[j + 1 : j + 2]
            if not nxt or nxt in _PP_WHITE or nxt in _SYNTACTIC:
                break
            j += 1
        elif s[j] in _SYNTACTIC or s[j].isspace():
            break
        else:
            j += 1
    return j


def _weight_op(s: str, i: int, numbers: bool) -> tuple[float, int]:
    """attention_weight_operator right after the target: a run of '+' (1.1**n), of '-' (0.9**n), or a number."""
    for ch, base in (("+", 1.1), ("-", 0.9)):
        if s[i : i + 1] == ch:
            j = i
            while j < len(s) and s[j] == ch:
                j += 1
            return pow(base, j - i), j
    if numbers:
        m = _REAL.match(s, i)
        if m:
            return float(m.group(0)), m.end()
    raise _NoMatch


def _quoted(s: str, i: int) -> tuple[list, int]:
    """A "quoted fragment": its inside parsed as a parenthesised fragment's (all of it, or no match)."""
    if s[i : i + 1] != '"':
        raise _NoMatch
    j = i + 1
    while j < len(s) and s[j] != '"':
        j += 2 if s[j : j + 2] == '\\"' else 1
    if j >= len(s):
        raise _NoMatch
    inner = s[i + 1 : j]
    if not inner.strip():
        return [("f", "")], j + 1
    nodes, k = _inner(inner, 0, closing=None)
    return nodes, j + 1


def _paren(s: str, i: int) -> tuple[list, int]:
    if s[i : i + 1] != "(":
        raise _NoMatch
    return _inner(s, i + 1, closing=")")


def _target(s: str, i: int, words: bool = True) -> tuple[list, int, bool]:
    """potential_operator_target: quoted | parenthesised | a plain word (is_word tells which)."""
    for f in (_quoted, _paren):
        try:
            nodes, j = f(s, i)
            return nodes, j, False
        except _NoMatch:
            pass
    if words:
        j = _word_end(s, i)
        if j > i:
            return [_frag(s[i:j])], j, True
    raise _NoMatch


def _attention(s: str, i: int) -> tuple[tuple, int]:
    nodes, j, is_word = _target(s, i)
    k = _skip(s, j)  # explicit: target.attend(op), whitespace allowed as pyparsing skips it
    if s.startswith(".attend", k):
        k = _skip(s, k + len(".attend"))
        if s[k : k + 1] == "(":
            try:
                w, m = _weight_op(s, _skip(s, k + 1), numbers=True)
                m = _skip(s, m)
                if s[m : m + 1] == ")":
                    return ("a", w, nodes), m + 1
            except _NoMatch:
                pass
    if j < len(s) and s[j] not in _PP_WHITE:  # implicit: no whitespace between target and operator
        w, m = _weight_op(s, j, numbers=not is_word)
        return ("a", w, nodes), m
    raise _NoMatch


def _inner(s: str, i: int, closing: str | None) -> tuple[list, int]:
    """fragment_including_commas_or_periods up to `closing` (or to the end of s)."""
    out = []
    while True:
        i = _skip(s, i)
        if closing is not None and s[i : i + 1] == closing:
            return out, i + 1
        if i >= len(s):
            if closing is None:
                return out, i
            raise _NoMatch
        found = _first(s, i, (_attention, _paren_node, _quoted_node))
        if found is not None:
            node, i = found
            out.append(node)
        else:
            j = _word_end(s, i)
            if j > i:
                out.append(_frag(s[i:j]))
                i = j
            elif s[i] in ",.":
                out.append(("f", s[i]))
                i += 1
            else:
                raise _NoMatch


def _first(s: str, i: int, parsers) -> tuple | None:
    """The first of `parsers` (in order: compel's alternatives are ordered) that matches at i, or None."""
    for f in parsers:
        try:
            return f(s, i)
        except _NoMatch:
            pass
    return None


def _paren_node(s, i):
    nodes, j = _paren(s, i)
    return ("g", nodes), j


def _quoted_node(s, i):
    nodes, j = _quoted(s, i)
    return ("g", nodes), j


def _unescaped(text: str, chars: str) -> bool:
    t = text.replace("\\(", "").replace("\\)", "").replace('\\"', "")
    return any(c in t for c in chars)


def _top_prompt(s: str, prompt: str) -> list:
    """compel's `prompt`: attention, quoted and parenthesised fragments, and free (whitespace-delimited) words."""
    out, i = [], 0
    while True:
        i = _skip(s, i)
        if i >= len(s):
            return out
        found = _first(s, i, (_attention, _quoted_node, _paren_node))
        if found is not None:
            node, i = found
            out.append(node)
        else:
            j = i
            while j < len(s) and not s[j].isspace():
                j += 1
            word = s[i:j]
            if _unescaped(word, '()"'):
                what = "a quote" if _unescaped(word, '"') and not _unescaped(word, "()") else "a parenthesis"
                raise _error(prompt, f"unbalanced {what} or an operator compel cannot parse near {word!r} "
                             "(write \\( \\) \\\" for the characters themselves)")  # fmt: skip
            out.append(_frag(word))
            i = j


def _options(s: str, i: int) -> tuple[list[str], int]:
    """'(' options ')' of .and()/.blend(): comma-separated items, up to the closing parenthesis."""
    i = _skip(s, i)
    if s[i : i + 1] != "(":
        raise _NoMatch
    j = s.find(")", i)
    if j < 0:
        raise _NoMatch
    items = [x.strip() for x in s[i + 1 : j].split(",")]
    return ([] if items == [""] else items), j + 1


def _operator_call(s: str, prompt: str):
    """`(target, target, ...).and(weights)` / `.add` / `.blend(weights[, no_normalize])` as the whole prompt."""
    i = _skip(s, 0)
    if s[i : i + 1] != "(":
        return None
    targets, i = [], i + 1
    try:
        while True:
            i = _skip(s, i)
            nodes, i, _ = _target(s, i)
            targets.append(nodes)
            i = _skip(s, i)
            if s[i : i + 1] == ",":
                i += 1
                continue
            if s[i : i + 1] != ")":
                raise _NoMatch
            i = _skip(s, i + 1)
            op = next((o for o in (".and", ".add", ".blend") if s.startswith(o, i)), None)
            if op is None:
                raise _NoMatch
            items, i = _options(s, i + len(op))
            break
    except _NoMatch:
        return None
    if s[i:].strip():
        raise _error(prompt, f"text after {op}() (compel ignores it): {s[i:].strip()!r}")
    normalize = True
    if op == ".blend" and items and items[-1] == "no_normalize":
        normalize, items = False, items[:-1]
    for x in items:
        if not _OPTION_NUMBER.fullmatch(x):
            raise _error(prompt, f"{op}() weight {x!r} is not a number")
    weights = [float(x) for x in items] or [1.0] * len(targets)
    if len(weights) != len(targets):
        raise _error(prompt, f"{op}() has {len(weights)} weights for {len(targets)} prompts")
    return op, targets, weights, normalize


def _flatten(nodes: list, scale: float = 1.0) -> list[Fragment]:
    out = []
    for n in nodes:
        if n[0] == "f":
            out.append((n[1], 1.0 * scale))  # ref: compel flatten_internal: Fragment(text, weight * scale)
        elif n[0] == "a":
            out += _flatten(n[2], scale * n[1])
        else:
            out += _flatten(n[1], scale)
    return out


def _fuse(frags: list[Fragment]) -> list[Fragment]:
    """ref: compel flatten.fuse_fragments: neighbours of equal weight join with a space."""
    out: list[Fragment] = []
    for text, w in frags:
        if out and out[-1][1] == w:
            out[-1] = (out[-1][0] + " " + text, w)
        else:
            out.append((text, w))
    return out


def parse_compel(prompt: str) -> Parsed:
    """ref: compel PromptParser.parse_conjunction + flatten (2.5.1)."""
    if not isinstance(prompt, str):
        raise RuntimeInputError(f"prompt {prompt!r} is not a string")
    if re.search(r"\.swap\s*\(", prompt):
        raise _error(prompt, "compel's .swap() (cross-attention control) is not supported")
    if re.search(r"(?:with|use)Lora\s*\(", prompt):
        raise _error(prompt, "withLora()/useLora() is not supported (fuse a LoRA with `python -m convert --lora`)")
    s = re.sub(r",(\S)", r", \1", prompt)  # compel: "enforce whitespace after ,"
    if not s.strip():
        return Parsed([[[("", 1.0)]]], [1.0])
    call = _operator_call(s, prompt)
    if call is None:
        frags = _fuse(_flatten(_top_prompt(s, prompt)))
        return Parsed([[frags]] if frags else [], [1.0] if frags else [])
    op, targets, weights, normalize = call
    flat = [_fuse(_flatten(t)) for t in targets]
    if op == ".blend":
        kept = [[f] for f in flat if f]
        if len(kept) != len(weights):
            raise _error(prompt, ".blend() of an empty prompt")
        return Parsed([Blend(kept, weights, normalize)], [1.0])
    parts = [([f], w) for f, w in zip(flat, weights, strict=True) if f]
    return Parsed([p for p, _ in parts], [w for _, w in parts])


def check_prompts(params) -> None:
    """GenerationParams' check: a known syntax, clip_skip only with plain, every prompt parses."""
    syntax = params.prompt_syntax
    if syntax not in SYNTAXES:
        raise RuntimeInputError(f"prompt_syntax={syntax!r}: choose one of {', '.join(SYNTAXES)}")
    if syntax == "plain":
        return
    if params.clip_skip is not None:
        raise RuntimeInputError(f"clip_skip works with prompt_syntax='plain' only (not {syntax!r})")
    for name in ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2"):
        value = getattr(params, name)
        for text in [value] if isinstance(value, str) else value or []:
            if isinstance(text, str):
                parsed = parse(text, syntax)
                if any(w != 1 for w in parsed.weights):
                    raise _error(text, ".and() weights other than 1 are not supported for SDXL (nor by compel)")
