"""Read a LoRA .safetensors file (numpy, no torch): its layers per component, each with its alpha/rank scaling.

Key formats (one LoRA layer = a down and an up weight, kohya adds an alpha):
  diffusers/PEFT  `unet.<module>.lora_A.weight` / `lora_B`, old `.lora.down.weight` / `.lora.up.weight`,
                  `.lora_linear_layer.down.weight`, `<attn>.processor.to_q_lora.down.weight`; prefixes `unet.`,
                  `text_encoder.`, `text_encoder_2.`; alpha/rank from the file's `lora_adapter_metadata` (peft
                  LoraConfig fields as diffusers' save_lora_weights writes them), otherwise 1 as diffusers
  kohya/A1111     `lora_unet_<module>`, `lora_te1_` (or `lora_te_`), `lora_te2_` + `.lora_down.weight`,
                  `.lora_up.weight`, `.alpha`; module names flattened with `_`, in diffusers spelling or in the
                  SGM UNet's (`input_blocks_4_1_...`); alpha per layer as kohya, A1111 and ComfyUI read it (diffusers
                  agrees while a file's layers of a kind share one alpha, the usual case)
LoCon (conv) layers are down [r, in, kh, kw] + up [out, r, 1, 1]. LoHa/LoKr, DoRA and LoRA biases are refused.
Same file rules as convert/lora.py (which fuses at conversion, with torch); this module is the runtime's reader.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.errors import RuntimeInputError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
DIFFUSERS_ROLES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                   ".lora.up.weight": "up", ".lora_linear_layer.down.weight": "down",
                   ".lora_linear_layer.up.weight": "up", "_lora.down.weight": "down",
                   "_lora.up.weight": "up"}  # fmt: skip
OLD_PROCESSOR = {"to_q_lora": ("to_q", "q_proj"), "to_k_lora": ("to_k", "k_proj"), "to_v_lora": ("to_v", "v_proj"),
                 "to_out_lora": ("to_out.0", "out_proj")}  # fmt: skip


@dataclass
class Layer:
    """One LoRA layer: the module as the file spells it, its weights (float16 as stored, else float32) and peft's
    alpha/rank scaling."""

    component: str
    module: str  # dotted (diffusers/PEFT) or flattened with "_" (kohya)
    kohya: bool
    key: str  # the down weight's key: what errors name
    down: np.ndarray | None = None  # [r, in] or [r, in, kh, kw]
    up: np.ndarray | None = None  # [out, r] or [out, r, 1, 1]
    alpha: float | None = None  # kohya's .alpha
    scaling: float = 1.0
    fed: dict = field(default_factory=dict, repr=False, compare=False)  # (role, dtype) -> converted (runtime.lora)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraFile:
    path: Path
    name: str  # the file's stem: A1111's <lora:NAME:...>
    layers: list[Layer]
    a1111_hash: str  # A1111's "Lora hashes" value: sha256 of the tensor data after the header, 12 hex digits
    stamp: tuple = field(default=(), repr=False)


def _classify(key: str) -> tuple[str, str, bool, str | None] | None:
    """key -> (component, module, kohya?, role or None), None if it names no component of SDXL's."""
    for prefix, component in KOHYA.items():
        if key.startswith(prefix):
            module, _, rest = key[len(prefix) :].partition(".")
            return component, module, True, KOHYA_ROLES.get(rest)
    component, _, rest = key.partition(".")
    if component not in COMPONENTS:
        return None
    for suffix, role in DIFFUSERS_ROLES.items():
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            if suffix.startswith("_lora"):  # <attn>.processor.to_q_lora
                parent, _, old = (module + "_lora").replace(".processor.", ".").rpartition(".")
                if old not in OLD_PROCESSOR:
                    return component, module, False, None
                module = f"{parent}.{OLD_PROCESSOR[old][component != 'unet']}"
            return component, module, False, role
    return component, rest, False, None


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return 8 + n, json.loads(f.read(n))


def _tensor(f, path: Path, key: str, header: list) -> np.ndarray:
    """One tensor: float16 as stored (half the memory of float32: the adapter's tensors are fed to a model that
    runs in bf16/f16 as they are), anything else as float32; bf16 (which numpy lacks) from its raw bytes."""
    dtype = f.get_slice(key).get_dtype()
    if dtype == "F16":
        return np.asarray(f.get_tensor(key), dtype=np.float16)
    if dtype != "BF16":
        return np.asarray(f.get_tensor(key), dtype=np.float32)
    if not header:
        header.extend(_header(path))
    start, meta = header
    a, b = meta[key]["data_offsets"]
    with open(path, "rb") as fh:
        fh.seek(start + a)
        raw = np.frombuffer(fh.read(b - a), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(meta[key]["shape"])


def _pattern_key(patterns, name: str) -> str | None:
    # ref: peft utils.other.get_pattern_key (rank_pattern/alpha_pattern keys match a module-name suffix)
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", name)), None)


def _scaling(path: Path, layer: Layer, metadata: dict) -> float:
    """alpha / rank of one layer, as diffusers + peft set it up (ref: peft LoraLayer.update_layer)."""
    rank = layer.rank
    if layer.kohya:
        return (layer.alpha if layer.alpha is not None else rank) / rank
    prefix = layer.component + "."
    config = {k[len(prefix) :]: v for k, v in metadata.items() if k.startswith(prefix)}
    if not config:  # ref: diffusers utils.peft_utils.get_peft_kwargs: no alphas -> alpha = rank
        return 1.0
    if config.get("use_dora"):
        raise RuntimeInputError(f"{path}: {layer.component} is a DoRA (use_dora in its metadata); not supported")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = rank_pattern.get(_pattern_key(rank_pattern, layer.module), config.get("r", 8))
    alpha = alpha_pattern.get(_pattern_key(alpha_pattern, layer.module), config.get("lora_alpha", 8))
    if r != rank:
        raise RuntimeInputError(f"{path}: layer '{layer.key}' has rank {rank}, its metadata says {r}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _check(path: Path, layer: Layer) -> None:
    """down [r, in(, kh, kw)], up [out, r(, 1, 1)], finite: else one line naming the layer."""
    down, up = layer.down, layer.up
    ok = down.ndim in (2, 4) and up.ndim == down.ndim and down.shape[0] > 0 and up.shape[1] == down.shape[0]
    ok = ok and all(d == 1 for d in up.shape[2:])
    if not ok:
        raise RuntimeInputError(f"{path}: layer '{layer.key}' is not a LoRA pair (down {list(down.shape)}, up "
                                f"{list(up.shape)}: the up weight's second dimension must be the rank)")  # fmt: skip
    if not (np.isfinite(down).all() and np.isfinite(up).all()) or (layer.alpha is not None
                                                                   and not math.isfinite(layer.alpha)):  # fmt: skip
        raise RuntimeInputError(f"{path}: layer '{layer.key}' holds non-finite values (nan or inf)")


def _a1111_hash(path: Path, start: int) -> str:
    """A1111's hash of a LoRA ("Lora hashes"): sha256 of the file after its header (ref: A1111
    modules/hashes.py addnet_hash_safetensors), first 12 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def read_lora(path: str | Path) -> LoraFile:
    """Every layer of the file with its weights and scaling; RuntimeInputError naming the file and the first
    offending key for anything that is not an SDXL LoRA we can apply."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise RuntimeInputError(f"{path}: no such LoRA file")
    try:
        with safe_open(str(path), framework="np") as f:
            keys, metadata = list(f.keys()), f.metadata() or {}
            layers: dict[tuple[str, str], Layer] = {}
            roles: dict[tuple[str, str], dict[str, str]] = {}
            for key in keys:
                found = _classify(key)
                if found is None:
                    raise RuntimeInputError(
                        f"{path}: key '{key}' is not an SDXL LoRA key (an SDXL LoRA's keys start with 'unet.', "
                        "'text_encoder.', 'text_encoder_2.' or kohya's 'lora_unet_', 'lora_te1_', 'lora_te2_': "
                        "a LoRA for another architecture?)"
                    )
                component, module, kohya, role = found
                if role is None:
                    raise RuntimeInputError(f"{path}: key '{key}' is not a LoRA down/up weight or alpha (LyCORIS "
                                            "LoHa/LoKr, DoRA and LoRA biases are not supported)")  # fmt: skip
                have = roles.setdefault((component, module), {})
                if role in have:
                    raise RuntimeInputError(f"{path}: keys '{have[role]}' and '{key}' name the same LoRA weight")
                have[role] = key
            header: list = []
            for (component, module), have in roles.items():
                if "down" not in have or "up" not in have:
                    some = have.get("down") or have.get("up") or have.get("alpha")
                    missing = "up" if "up" not in have else "down"
                    raise RuntimeInputError(f"{path}: key '{some}' has no matching {missing} weight")
                layer = Layer(component, module, have["down"].startswith(tuple(KOHYA)), have["down"])
                layer.down = _tensor(f, path, have["down"], header)
                layer.up = _tensor(f, path, have["up"], header)
                if "alpha" in have:
                    alpha = _tensor(f, path, have["alpha"], header)
                    if alpha.size != 1:
                        raise RuntimeInputError(f"{path}: key '{have['alpha']}' is not a single number")
                    layer.alpha = float(alpha.reshape(()))
                _check(path, layer)
                layers[(component, module)] = layer
    except (SafetensorError, OSError, ValueError, TypeError, KeyError, struct.error) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RuntimeInputError(f"{path}: not a readable .safetensors LoRA ({reason}; truncated?)") from None
    if not layers:
        raise RuntimeInputError(f"{path}: no tensors; not a LoRA")
    raw = metadata.get("lora_adapter_metadata")
    try:
        config = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise RuntimeInputError(f"{path}: unreadable lora_adapter_metadata ({e})") from None
    for layer in layers.values():
        layer.scaling = _scaling(path, layer, config if isinstance(config, dict) else {})
    start = header[0] if header else _header(path)[0]
    return LoraFile(path, path.stem, list(layers.values()), _a1111_hash(path, start))


_CACHE: weakref.WeakValueDictionary[tuple, LoraFile] = weakref.WeakValueDictionary()  # while loaded somewhere
_CACHE_LOCK = threading.Lock()


def load_lora(path: str | Path) -> LoraFile:
    """read_lora, once per file version (path, size, mtime): loading a file again while a pipeline holds it reads
    nothing (the weights are held once, by the pipelines that loaded them)."""
    p = Path(path)
    try:
        st = p.stat()
        stamp = (os.path.realpath(p), st.st_size, st.st_mtime_ns)
    except OSError:
        return read_lora(p)  # one line: no such file
    with _CACHE_LOCK:
        hit = _CACHE.get(stamp)
    if hit is not None:
        return hit
    lora = read_lora(p)
    lora.stamp = stamp
    with _CACHE_LOCK:
        _CACHE[stamp] = lora
    return lora
