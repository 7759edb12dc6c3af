"""A1111's prompt syntax -> runtime.prompts' weighted fragments (the same weighting as compel's).

ref: A1111 modules/prompt_parser.parse_prompt_attention: (x) x1.1, [x] x1/1.1, (x:w) xw, nesting multiplies,
\\( escapes, BREAK starts a new 77-token chunk. Unlike A1111, unbalanced brackets and a weight that is not a
number are errors (A1111 closes brackets at the end and reads `:x)` as text); prompt editing [a:b:when],
alternation [a|b] and extra networks <lora:...> are refused. README ("Prompt syntax") lists where A1111's own
result differs.
"""

from __future__ import annotations

import re

from runtime.errors import RuntimeInputError
from runtime.prompts import Parsed, Segments, _error

_A1111_TOKENS = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_A1111_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_WEIGHT_NOT_NUMBER = re.compile(r":\s*([^\s()\[\]]*)\s*\)")


def parse_a1111(prompt: str) -> Parsed:
    """ref: A1111 modules/prompt_parser.parse_prompt_attention: (x) x1.1, [x] x1/1.1, (x:w) xw, nesting
    multiplies, \\( escapes, BREAK starts a new chunk; equal neighbours merge (no space added, as A1111)."""
    if not isinstance(prompt, str):
        raise RuntimeInputError(f"prompt {prompt!r} is not a string")
    if re.search(r"<(?:lora|lyco|hypernet):", prompt):
        raise _error(prompt, "A1111 extra networks (<lora:...>) are not supported (fuse a LoRA at convert time)")
    res: list[list] = []  # [text, weight, is_break]
    round_, square = [], []

    def multiply(start: int, m: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= m

    for m in _A1111_TOKENS.finditer(prompt):
        text, weight = m.group(0), m.group(1)
        if text.startswith("\\"):
            res.append([text[1:], 1.0, False])
        elif text == "(":
            round_.append(len(res))
        elif text == "[":
            square.append(len(res))
        elif weight is not None:
            if not round_:
                raise _error(prompt, f"{text!r} closes no parenthesis")
            try:
                w = float(weight)
            except ValueError:
                raise _error(prompt, f"weight {weight!r} is not a number") from None
            multiply(round_.pop(), w)
        elif text == ")":
            if not round_:
                raise _error(prompt, "unbalanced parenthesis: ')' closes nothing (write \\) for the character)")
            multiply(round_.pop(), 1.1)
        elif text == "]":
            if not square:
                raise _error(prompt, "unbalanced bracket: ']' closes nothing (write \\] for the character)")
            multiply(square.pop(), 1 / 1.1)
        else:
            if text == ":" and square:
                raise _error(prompt, "A1111 prompt editing [from:to:when] is not supported")
            if "|" in text and square:
                raise _error(prompt, "A1111 alternation [a|b] is not supported")
            if text == ":" and round_:
                bad = _WEIGHT_NOT_NUMBER.match(prompt, m.start())
                if bad:
                    raise _error(prompt, f"weight {bad.group(1)!r} is not a number")
            for i, part in enumerate(_A1111_BREAK.split(text)):
                if i > 0:
                    res.append(["BREAK", -1.0, True])
                res.append([part, 1.0, False])
    if round_ or square:
        what = "parenthesis '('" if round_ else "bracket '['"
        raise _error(prompt, f"unbalanced {what} is never closed (write \\( or \\[ for the character)")
    if not res:
        res = [["", 1.0, False]]
    i = 0
    while i + 1 < len(res):  # ref: parse_prompt_attention's merge of equal weights
        if res[i][1] == res[i + 1][1] and not res[i][2] and not res[i + 1][2]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    segments: Segments = [[]]
    for text, w, is_break in res:
        if is_break:
            segments.append([])
        elif text:  # the empty text beside a BREAK tokenizes to nothing
            segments[-1].append((text, float(w)))
    segments = [seg or [("", 1.0)] for seg in segments]
    return Parsed([segments], [1.0])
