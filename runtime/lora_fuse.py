"""LoRA adapters fused into the weights at run time: diffusers' fuse_lora() for the compiled models.

The branches of runtime/lora.py switch adapters without recompiling, at a cost per step (a rank-64 LoRA on SDXL's
attention and feed-forward layers: about a tenth of a UNet call, README "LoRA at run time"). fuse_lora() trades the
other way: each targeted layer's weight constant becomes W + lora_scale x sum over the active adapters of
weight x alpha / r x B @ A (ref: peft tuners.lora.layer.Linear.get_delta_weight / Conv2d.get_delta_weight, as
diffusers' fuse_lora merges them), the model is compiled with those constants, and a step costs what the same LoRA
fused at conversion costs. Every change of the set in force compiles the models once more.

The fused weight keeps the IR's weight type (an fp16 IR: W + delta rounded to fp16, as `convert --lora` fuses).
Weight-compressed layers (int8/int4: a quantized constant and its scales) are refused: fusing would quantize W + delta
again, which is a conversion's job; their adapters run as branches."""

from __future__ import annotations

import numpy as np
import openvino as ov

from runtime.errors import RuntimeInputError
from runtime.lora_files import Layer


def weight_constant(node: ov.Node) -> ov.Node | None:
    """The float Constant a layer's weight is (directly or through one Convert), None for anything else (a
    decompression subgraph of a weight-compressed layer)."""
    source = node.input(1).get_source_output().get_node()
    if source.get_type_name() == "Convert":
        source = source.input(0).get_source_output().get_node()
    if source.get_type_name() != "Constant" or source.get_output_element_type(0) not in (ov.Type.f16, ov.Type.f32):
        return None
    return source


def check_fusable(model: ov.Model, table: dict, modules: list[str], shown: str) -> None:
    """One line naming the first targeted layer whose weight is not a plain float constant."""
    ops = {op.get_friendly_name(): op for op in model.get_ops()}
    for module in modules:
        node = ops.get(table[module][0])
        if node is not None and weight_constant(node) is None:
            raise RuntimeInputError(f"fuse_lora: {shown}'s {module} has a compressed weight (int8/int4 folder): its "
                                    "adapters run unfused (unfuse_lora())")  # fmt: skip


def delta(kind: str, terms: list[tuple[Layer, float]]) -> np.ndarray:
    """sum of scale x B @ A over the terms ((layer, scale) with scale = alpha / r x adapter weight x lora_scale), in
    float32, shaped as the layer's weight [out, in(, kh, kw)]."""
    out = None
    for layer, scale in terms:
        down, up = layer.down.astype(np.float32), layer.up.astype(np.float32)
        if kind == "linear":
            d = up @ down
        else:  # ref: peft Conv2d.get_delta_weight: a 1x1 up after any down kernel
            d = np.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        d *= np.float32(scale)
        out = d if out is None else out + d
    return out


def fuse(model: ov.Model, table: dict, terms: dict[str, list[tuple[Layer, float]]]) -> ov.Model:
    """Replace each module's weight constant (in place) by the fused one, in the constant's own type."""
    ops = {op.get_friendly_name(): op for op in model.get_ops()}
    for module, module_terms in terms.items():
        friendly, kind, _ = table[module]
        node = ops.get(friendly)
        if node is None:  # not in this (derived) model: DeepCache's shallow branch runs without it
            continue
        const = weight_constant(node)
        if const is None:
            raise RuntimeInputError(f"fuse_lora: {module} has a compressed weight (int8/int4 folder)")
        w = const.get_data()
        d = delta(kind, module_terms)
        if kind == "linear" and not node.get_attributes().get("transpose_b"):
            d = d.T  # the weight stored [in, out]
        fused = ov.opset13.constant((w.astype(np.float32) + d).astype(w.dtype))
        for target in list(const.output(0).get_target_inputs()):
            target.replace_source_output(fused.output(0))
    model.validate_nodes_and_infer_types()
    return model
