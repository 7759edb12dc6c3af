"""LoRA adapters for the server: A1111's `<lora:NAME:WEIGHT>` prompt tags and the OpenAI route's `loras` field,
resolved by NAME in `--lora-dir` (never a path from a client), applied at run time before each job
(runtime.lora_api: loaded once per file, switched without recompiling)."""

from __future__ import annotations

import math
import re
from pathlib import Path

from runtime.serve.requests import bad

# A1111's extra-network syntax: <lora:NAME> or <lora:NAME:WEIGHT> (a second number, the text encoder's weight in
# A1111's own loader, is refused: one weight per adapter here, as diffusers' set_adapters)
TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::([^>]*))?>")
SUFFIXES = (".safetensors",)


class LoraLibrary:
    def __init__(self, folder: str | Path | None):
        self.dir = Path(folder) if folder else None

    def names(self) -> list[str]:
        if self.dir is None or not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.iterdir() if p.suffix in SUFFIXES and p.is_file())

    def path(self, name: str, param: str) -> Path:
        if self.dir is None:
            raise bad(f"LoRA {name!r}: this server has no --lora-dir", param)
        known = self.names()
        if name not in known:  # only names listed in the folder: no path from a client reaches the disk
            raise bad(f"unknown LoRA {name!r}; this server has: {', '.join(known) or 'none'}", param)
        return next(self.dir / f"{name}{s}" for s in SUFFIXES if (self.dir / f"{name}{s}").is_file())


def _weight(text, name: str, param: str) -> float:
    try:
        w = float(text)
    except (TypeError, ValueError):
        raise bad(f"LoRA {name!r}: weight {text!r} is not a number", param) from None
    if not math.isfinite(w) or abs(w) > 100:
        raise bad(f"LoRA {name!r}: weight {text!r} must be a finite number within +-100", param)
    return w


def from_prompt(prompt: str, library: LoraLibrary) -> tuple[str, list[tuple[str, float]]]:
    """A1111: the prompt without its <lora:...> tags, and the adapters they name (a repeated name adds up)."""
    found: dict[str, float] = {}
    for m in TAG.finditer(prompt):
        name, weight, te_weight = m.group(1).strip(), m.group(2), m.group(3)
        if te_weight is not None:
            raise bad(f"<lora:{name}:...>: separate text-encoder weights are not supported", "prompt")
        library.path(name, "prompt")
        found[name] = found.get(name, 0.0) + (1.0 if weight in (None, "") else _weight(weight, name, "prompt"))
    return TAG.sub("", prompt).strip(), list(found.items())


def from_field(value, library: LoraLibrary) -> list[tuple[str, float]]:
    """The OpenAI route's `loras`: {"NAME": WEIGHT, ...} or [{"name": NAME, "weight": WEIGHT}, ...]."""
    if value in (None, [], {}):
        return []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list) and all(isinstance(x, dict) and "name" in x for x in value):
        items = [(x["name"], x.get("weight", 1.0)) for x in value]
    else:
        raise bad('loras must be {"NAME": WEIGHT, ...} or [{"name": NAME, "weight": WEIGHT}, ...]', "loras")
    out: dict[str, float] = {}
    for name, weight in items:
        if not isinstance(name, str):
            raise bad("loras: a name must be a string", "loras")
        library.path(name, "loras")
        out[name] = _weight(weight, name, "loras")
    return list(out.items())


def apply(pipe, library: LoraLibrary, loras: list[tuple[str, float]], loaded: set[str]) -> None:
    """Make `loras` the pipeline's active adapters (in the model's worker thread, before its job runs): a file
    loads once, under its name (`loaded` holds the names loaded so far); no LoRA -> none active."""
    if not loras and not loaded:
        return
    for name, _ in loras:
        if name not in loaded:
            pipe.load_lora_weights(library.path(name, "loras"), adapter_name=name)
            loaded.add(name)
    pipe.set_adapters([n for n, _ in loras], [w for _, w in loras])
