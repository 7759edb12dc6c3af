"""Fuse LoRAs into the UNet and the text encoders before tracing: W += scale * alpha/rank * up @ down.

The traced graphs then hold plain weights, no LoRA or PEFT layers. The fused weights are diffusers': one LoRA as
`pipe.load_lora_weights(file, adapter_name=...)` + `pipe.fuse_lora(lora_scale=scale)`; several, each with its own
scale, as `load_lora_weights` for each + `set_adapters(names, adapter_weights=scales)` + `fuse_lora()`: the deltas add
up. (Loading a LoRA after `fuse_lora` makes diffusers 0.42 + peft 0.21 unfuse the first one, so that is not a way to
stack them.) Kohya alphas are per layer, as kohya, A1111 and ComfyUI read them; diffusers agrees while a file's
attention and CLIP layers share one alpha (the usual case) and otherwise gives those layers the file's most common one.

Key formats read (one LoRA layer = a down and an up weight, kohya adds an alpha):
  diffusers/PEFT  `unet.<module>.lora_A.weight` / `lora_B`, old `.lora.down.weight` / `.lora.up.weight`,
                  `.lora_linear_layer.down.weight`, `<attn>.processor.to_q_lora.down.weight`; prefixes `unet.`,
                  `text_encoder.`, `text_encoder_2.`; alpha/rank from the file's `lora_adapter_metadata` (diffusers'
                  save_lora_weights), otherwise 1 like diffusers
  kohya           `lora_unet_<module>`, `lora_te1_` (or `lora_te_`), `lora_te2_` + `.lora_down.weight`,
                  `.lora_up.weight`, `.alpha`; module names in diffusers spelling (`down_blocks_1_attentions_0_...`)
                  or in the original SGM UNet's (`input_blocks_4_1_...`, what kohya's SDXL trainer writes)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from convert.errors import ConvertError

# the file formats (keys, roles, SGM names) are the runtime's: one reading of a LoRA file for both
from runtime.lora_files import COMPONENTS, _classify
from runtime.lora_layers import _to_sgm

if TYPE_CHECKING:
    import torch

SHOWN = {"unet": "the UNet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}


@dataclass
class Layer:
    """One LoRA layer of a file: the keys of its weights and the module they name, as the file spells it."""

    component: str
    module: str  # dotted (diffusers/PEFT) or flattened with "_" (kohya)
    kohya: bool
    down: str | None = None
    up: str | None = None
    alpha: str | None = None


@dataclass
class LoraFile:
    path: Path
    layers: list[Layer]  # in key order
    metadata: dict  # diffusers' lora_adapter_metadata (peft LoraConfig fields, prefixed by component), or {}


def read_lora(path: Path) -> LoraFile:
    """Read a LoRA file's keys and metadata (not its tensors); ConvertError for anything we cannot fuse."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ConvertError(f"{path}: no such LoRA file")
    try:
        with safe_open(path, framework="pt") as f:
            keys, header = sorted(f.keys()), f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ConvertError(f"{path}: not a readable .safetensors file ({e}); LoRAs are read from .safetensors "
                           "files only") from None  # fmt: skip
    if not keys:
        raise ConvertError(f"{path}: no tensors; not a LoRA")
    layers: dict[tuple[str, str], Layer] = {}
    for key in keys:
        found = _classify(key)
        if found is None:
            raise ConvertError(f"{path}: key '{key}' matches no component (a LoRA for the UNet and text encoders of an "
                               "SDXL pipeline has keys 'unet.', 'text_encoder.', 'text_encoder_2.' or kohya's "
                               "'lora_unet_', 'lora_te1_', 'lora_te2_')")  # fmt: skip
        component, module, kohya, role = found
        if role is None:
            raise ConvertError(f"{path}: key '{key}' is not a LoRA down/up weight or alpha (LyCORIS LoHa/LoKr, DoRA "
                               "and LoRA biases are not supported)")  # fmt: skip
        layer = layers.setdefault((component, module), Layer(component, module, kohya))
        if getattr(layer, role) is not None:
            raise ConvertError(f"{path}: keys '{getattr(layer, role)}' and '{key}' name the same LoRA weight")
        setattr(layer, role, key)
    for layer in layers.values():
        if layer.down is None or layer.up is None:
            have = layer.down or layer.up or layer.alpha
            raise ConvertError(f"{path}: key '{have}' has no matching {'up' if layer.up is None else 'down'} weight")
    raw = header.get("lora_adapter_metadata")
    try:
        metadata = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}: unreadable lora_adapter_metadata ({e})") from None
    return LoraFile(path, list(layers.values()), metadata)


def check_loras(loras: list[tuple[str | Path, float]], components: list[str] | None = None, source=None) -> None:
    """Every file exists and is a .safetensors LoRA of the UNet/text encoders, every scale a finite number.
    components: the pipeline's components, when known (a refiner has no text_encoder).
    source: a convert.source.Source: every layer is also matched to its module and its shapes checked against the
    models its configs build on the meta device (nothing loaded), and every tensor must be finite, before any work."""
    for path, scale in loras:
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
            raise ConvertError(f"--lora {path}: scale {scale!r} is not a finite number")
        lora = read_lora(Path(path))
        for layer in lora.layers:
            if components is not None and layer.component not in components:
                raise ConvertError(f"{path}: key '{layer.down}' is for {layer.component}, which this pipeline "
                                   "does not have")  # fmt: skip
    if source is not None:
        _check_against(loras, source)


def _check_against(loras: list[tuple[str | Path, float]], source) -> None:
    """check_loras' checks against the source's models (on the meta device, from its configs), as apply_loras does
    them; a single file without --config (configs from the hub) is checked for finite values only."""
    import torch
    from safetensors import safe_open

    from convert.source import empty_model

    modules: dict[str, Modules | None] = {}
    for path, _ in loras:
        lora = read_lora(Path(path))
        with safe_open(lora.path, framework="pt") as f:
            for name in ("text_encoder", "text_encoder_2", "unet"):  # in the order they are converted
                layers = [layer for layer in lora.layers if layer.component == name]
                if not layers:
                    continue
                if name not in modules:
                    model = empty_model(source, name)
                    modules[name] = None if model is None else Modules(name, model)
                if modules[name] is not None:
                    _plan(lora, layers, modules[name], f)
            for layer in lora.layers:
                for key in (layer.down, layer.up, layer.alpha):
                    if key is not None and not torch.isfinite(f.get_tensor(key)).all():
                        raise ConvertError(f"{path}: key '{key}' holds non-finite values (nan or inf)")


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _sgm_prefixes(unet) -> dict[str, str]:
    """diffusers module path -> the original (SGM) UNet's, numbered block by block as the SGM UNet is built.
    ref: diffusers lora_conversion_utils._maybe_map_sgm_blocks_to_diffusers (same numbers for SDXL's layout)"""
    m = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
         "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
         "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
    i = 1
    for b, block in enumerate(unet.down_blocks):
        for j in range(len(block.resnets)):
            m[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            if getattr(block, "attentions", None):
                m[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
            i += 1
        if block.downsamplers:
            m[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    mid = unet.mid_block
    if mid is not None:
        parts = [f"resnets.{k}" for k in range(len(mid.resnets))]
        for k in range(len(getattr(mid, "attentions", None) or [])):
            parts.insert(2 * k + 1, f"attentions.{k}")
        m.update({f"mid_block.{p}": f"middle_block.{k}" for k, p in enumerate(parts)})
    i = 0
    for b, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            m[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{i}.0"
            if attentions:
                m[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
            if j == len(block.resnets) - 1 and block.upsamplers:
                m[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{i}.{2 if attentions else 1}.conv"
            i += 1
    return m


class Modules:
    """The Linear and Conv2d modules of a component, found by the names LoRA files give them."""

    def __init__(self, component: str, model):
        import torch

        self.component = component
        self.modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}
        # CLIP: transformers 5 drops `text_model.` from CLIPTextModel (not from CLIPTextModelWithProjection); LoRA
        # files have it or not, depending on the library that wrote them
        self.dotted = {self._canonical(n): n for n in self.modules}
        flat: dict[str, str | None] = {}
        sgm = _sgm_prefixes(model) if component == "unet" else {}
        for canonical, name in self.dotted.items():
            for alias in (canonical, _to_sgm(canonical, sgm) if sgm else None):
                if alias is not None:
                    flat[_flat(alias)] = None if flat.get(_flat(alias), name) != name else name  # None: ambiguous
        self.flat = flat

    def _canonical(self, name: str) -> str:
        return name.removeprefix("text_model.") if self.component != "unet" else name

    def find(self, layer: Layer) -> str | None:
        if layer.kohya:
            return self.flat.get(layer.module if self.component == "unet" else layer.module.removeprefix("text_model_"))
        return self.dotted.get(self._canonical(layer.module))


def _pattern_key(patterns, name: str) -> str | None:
    # ref: peft utils.other.get_pattern_key (rank_pattern/alpha_pattern keys match a module-name suffix)
    return next((p for p in patterns if re.match(rf"(.*\.)?({p})$", name)), None)


def _scaling(lora: LoraFile, layer: Layer, module: str, rank: int, f) -> float:
    """alpha / rank of one layer, as diffusers + peft set it up (LoraLayer.update_layer)."""
    if layer.kohya:
        return (f.get_tensor(layer.alpha).item() if layer.alpha else rank) / rank
    prefix = layer.component + "."
    config = {k[len(prefix) :]: v for k, v in lora.metadata.items() if k.startswith(prefix)}
    if not config:  # ref: diffusers utils.peft_utils.get_peft_kwargs: no alphas -> alpha = rank for every module
        return 1.0
    if config.get("use_dora"):
        raise ConvertError(f"{lora.path}: {layer.component} is a DoRA (use_dora in its metadata); not supported")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = rank_pattern.get(_pattern_key(rank_pattern, module), config.get("r", 8))
    alpha = alpha_pattern.get(_pattern_key(alpha_pattern, module), config.get("lora_alpha", 8))
    if r != rank:
        raise ConvertError(f"{lora.path}: key '{layer.down}' has rank {rank}, its metadata says {r}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _check_shapes(lora: LoraFile, layer: Layer, module: str, weight_shape, f) -> int:
    """-> the rank; ConvertError naming the key when down/up do not fit the module's weight."""
    down, up = f.get_slice(layer.down).get_shape(), f.get_slice(layer.up).get_shape()
    out, rest = weight_shape[0], list(weight_shape[1:])
    rank = down[0] if down else 0
    ok = len(down) == len(weight_shape) and down[1:] == rest and rank > 0
    ok = ok and len(up) == len(weight_shape) and up[:2] == [out, rank] and all(d == 1 for d in up[2:])
    if not ok:
        raise ConvertError(f"{lora.path}: key '{layer.down}' does not match {SHOWN[layer.component]} (down {down}, "
                           f"up {up} for module {module} of weight {list(weight_shape)})")  # fmt: skip
    if layer.alpha and f.get_slice(layer.alpha).get_shape() not in ([], [1]):
        raise ConvertError(f"{lora.path}: key '{layer.alpha}' is not a single number")
    return rank


def apply_loras(name: str, model: torch.nn.Module, loras: list[tuple[Path, float]]) -> torch.nn.Module:
    """Fuse the LoRAs' layers for component `name` into `model`'s weights (in place) -> model.
    ref: diffusers LoraBaseMixin.fuse_lora -> peft LoraLayer.scale_layer + merge (Linear/Conv2d.get_delta_weight)"""
    import torch
    from safetensors import safe_open

    if name not in COMPONENTS:
        return model
    modules = None
    for path, scale in loras:
        lora = read_lora(Path(path))
        layers = [layer for layer in lora.layers if layer.component == name]
        if not layers:
            continue
        modules = modules or Modules(name, model)
        with safe_open(lora.path, framework="pt") as f:
            plan = _plan(lora, layers, modules, f)  # every key is checked before any weight changes
            with torch.no_grad():
                for layer, module, scaling in plan:
                    weight = modules.modules[module].weight
                    down, up = f.get_tensor(layer.down).float(), f.get_tensor(layer.up).float()
                    scaling *= scale  # peft scale_layer, then merge: W += (B @ A) * scaling
                    delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * scaling
                    fused = weight.float() + delta
                    if not torch.isfinite(fused).all() and torch.isfinite(weight).all():
                        raise ConvertError(f"{path}: fusing key '{layer.down}' (scale {scale:g}) makes "
                                           f"{SHOWN[name]} weight {module} non-finite (inf or nan)")  # fmt: skip
                    weight.copy_(fused.to(weight.dtype))
    return model


def _plan(lora: LoraFile, layers: list[Layer], modules: Modules, f) -> list[tuple[Layer, str, float]]:
    """-> (layer, module name, alpha/rank) per layer; ConvertError naming the first key that does not fit."""
    plan = []
    for layer in layers:
        module = modules.find(layer)
        if module is None:
            raise ConvertError(f"{lora.path}: key '{layer.down}' does not match {SHOWN[layer.component]} "
                               f"(no Linear or Conv2d module {layer.module})")  # fmt: skip
        rank = _check_shapes(lora, layer, module, list(modules.modules[module].weight.shape), f)
        plan.append((layer, module, _scaling(lora, layer, module, rank, f)))
    return plan
