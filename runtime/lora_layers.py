"""The layers a LoRA file targets in a component's IR: found by the module paths torch tracing writes into the node
names (`__module.model.down_blocks.1...to_q/aten::linear`, our converter's and optimum-cli's), under diffusers'/PEFT
names and kohya's (flattened, the SGM UNet's block names as SDXL kohya files use them). runtime/lora.py grafts
branches onto them, runtime/lora_fuse.py fuses into them."""

from __future__ import annotations

import re

import openvino as ov

from runtime.errors import RuntimeInputError
from runtime.lora_files import Layer, LoraFile

SHOWN = {"unet": "the UNet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
# torch's linear/conv as traced (`ov_ext::linear`: the converter's fp16 linear extension)
_OP = re.compile(r"/(?:aten|ov_ext)::(linear|_convolution|conv2d)/(MatMul|Convolution)$")
# ref: diffusers lora_conversion_utils._convert_unet_lora_key: the SGM ResnetBlock's layers -> diffusers' names
TO_SGM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip


def _module_path(friendly: str) -> str:
    path = friendly.split("/", 1)[0].removeprefix("__module.")
    return path.removeprefix("model.")


def targets(model: ov.Model, component: str) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """canonical module -> (node friendly name, "linear" | "conv", weight shape [out, in(, kh, kw)]) for every
    Linear/Conv2d of the IR whose weight is a constant (plain or decompressed)."""
    found: dict[str, tuple[str, str, tuple[int, ...]] | None] = {}
    for op in model.get_ops():
        m = _OP.search(op.get_friendly_name())
        if m is None or not op.input(1).get_partial_shape().is_static:
            continue
        shape = tuple(op.input(1).get_partial_shape().to_shape())
        if op.get_type_name() == "MatMul":
            attrs = op.get_attributes()
            if attrs.get("transpose_a") or len(shape) != 2:
                continue
            shape = shape if attrs.get("transpose_b") else shape[::-1]
            kind = "linear"
        else:
            if len(shape) != 4:
                continue
            kind = "conv"
        name = _canonical(_module_path(op.get_friendly_name()), component)
        found[name] = None if name in found else (op.get_friendly_name(), kind, shape)  # None: ambiguous
    return {k: v for k, v in found.items() if v is not None}


def _canonical(name: str, component: str) -> str:
    # transformers 5 drops `text_model.` from CLIPTextModel; LoRA files have it or not, depending on their writer
    return name.removeprefix("text_model.") if component != "unet" else name


def _sgm_prefixes(modules) -> dict[str, str]:
    """diffusers UNet module path -> the original (SGM) UNet's, numbered block by block from the module paths.
    ref: diffusers lora_conversion_utils._maybe_map_sgm_blocks_to_diffusers (same numbers for SDXL's layout)"""
    has = set()
    for name in modules:
        parts = name.split(".")
        for n in range(1, len(parts) + 1):
            has.add(".".join(parts[:n]))
    m = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
         "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
         "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip

    def count(prefix):
        return sum(1 for k in range(64) if f"{prefix}.{k}" in has)

    i = 1
    for b in range(count("down_blocks")):
        for j in range(count(f"down_blocks.{b}.resnets")):
            m[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            m[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
            i += 1
        if f"down_blocks.{b}.downsamplers.0.conv" in has:
            m[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    parts = [f"resnets.{k}" for k in range(count("mid_block.resnets"))]
    for k in range(count("mid_block.attentions")):
        parts.insert(2 * k + 1, f"attentions.{k}")
    m.update({f"mid_block.{p}": f"middle_block.{k}" for k, p in enumerate(parts)})
    i = 0
    for b in range(count("up_blocks")):
        n = count(f"up_blocks.{b}.resnets")
        attentions = count(f"up_blocks.{b}.attentions") > 0
        for j in range(n):
            m[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{i}.0"
            m[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
            if j == n - 1 and f"up_blocks.{b}.upsamplers.0.conv" in has:
                m[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{i}.{2 if attentions else 1}.conv"
            i += 1
    return m


def _to_sgm(name: str, prefixes: dict[str, str]) -> str | None:
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        head, tail = ".".join(parts[:n]), ".".join(parts[n:])
        if head in prefixes:
            if ".resnets." in head:
                tail = TO_SGM_RESNET.get(tail, tail)
            return prefixes[head] + (f".{tail}" if tail else "")
    return None


class Modules:
    """The LoRA-targetable layers of one component's IR, found by the names LoRA files give them."""

    def __init__(self, component: str, model: ov.Model):
        self.component = component
        self.table = targets(model, component)
        flat: dict[str, str | None] = {}
        sgm = _sgm_prefixes(self.table) if component == "unet" else {}
        for name in self.table:
            for alias in (name, _to_sgm(name, sgm) if sgm else None):
                if alias is not None:
                    a = alias.replace(".", "_")
                    flat[a] = None if flat.get(a, name) != name else name  # None: ambiguous
        self.flat = flat

    def find(self, layer: Layer) -> str | None:
        if layer.kohya:
            module = layer.module if self.component == "unet" else layer.module.removeprefix("text_model_")
            return self.flat.get(module)
        return _canonical(layer.module, self.component) if _canonical(layer.module, self.component) in self.table \
            else None  # fmt: skip

    def plan(self, lora: LoraFile) -> dict[str, Layer]:
        """module -> layer for this component's layers of the file; one line naming the first that does not fit."""
        out: dict[str, Layer] = {}
        for layer in lora.layers:
            if layer.component != self.component:
                continue
            module = self.find(layer)
            if module is None:
                raise RuntimeInputError(f"{lora.path}: layer '{layer.key}' matches no layer of {SHOWN[self.component]} "
                                        f"({layer.module}): a LoRA for another model?")  # fmt: skip
            _, kind, shape = self.table[module]
            fits = layer.down.ndim == len(shape) and tuple(layer.down.shape[1:]) == shape[1:]
            fits = fits and layer.up.shape[0] == shape[0]
            if not fits:
                raise RuntimeInputError(
                    f"{lora.path}: layer '{layer.key}' does not fit {SHOWN[self.component]}'s {module} (weight "
                    f"{list(shape)}; down {list(layer.down.shape)}, up {list(layer.up.shape)})"
                )
            out[module] = layer
        return out
