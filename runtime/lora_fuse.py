"""LoRA adapters fused into the weights at run time: diffusers' fuse_lora() for the compiled models.

The branches of runtime/lora.py switch adapters without recompiling, at a cost per step (a rank-64 LoRA on SDXL's
attention and feed-forward layers: about a tenth of a UNet call, README "LoRA at run time"). fuse_lora() trades the
other way: each targeted layer's weight constant becomes W + lora_scale x sum over the active adapters of
weight x alpha / r x B @ A (ref: peft tuners.lora.layer.Linear.get_delta_weight / Conv2d.get_delta_weight, as
diffusers' fuse_lora merges them), the model is compiled with those constants, and a step costs what the same LoRA
fused at conversion costs. Every change of the set in force compiles the models once more.

The fused weight keeps the IR's weight type (an fp16 IR: W + delta rounded to fp16, as `convert --lora` fuses).
The fused weights are written to a file (in `spill_dir`) and read back through a shared map, unlinked at once:
OpenVINO's compiled model keeps the constants it was compiled from, and an IR's own weights are file-mapped pages
that can be dropped once compiled (runtime.ov_model.drop_mapped_pages); fused weights held in memory stayed in the
RSS (real-size SDXL: 4.3 GiB of fp16, 11.68 GiB RSS against 7.46 GiB with branches).
Weight-compressed layers (int8/int4: a quantized constant and its scales) are refused: fusing would quantize W + delta
again, which is a conversion's job; their adapters run as branches."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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


def fuse(model: ov.Model, table: dict, terms: dict[str, list[tuple[Layer, float]]], spill_dir=None,
         spilled: list | None = None) -> ov.Model:  # fmt: skip
    """Replace each module's weight constant (in place) by the fused one, in the constant's own type. With
    spill_dir, the fused weights are written there as they are made and file-mapped (the file's path appended to
    `spilled`, for dropping its pages); a file that cannot be made there: held in memory."""
    ops = {op.get_friendly_name(): op for op in model.get_ops()}
    spill = _Spill(Path(spill_dir)) if spill_dir is not None else None
    fused = []
    try:
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
            d += w
            arr = d.astype(w.dtype)
            del d
            fused.append((const, spill.add(arr) if spill is not None and spill.file else arr))
        if spill is not None and spill.file:
            fused = spill.mapped(fused, spilled)
    finally:
        if spill is not None:
            spill.close()
    for const, arr in fused:
        new = ov.opset13.constant(arr, shared_memory=isinstance(arr, np.ndarray) and arr.base is not None)
        for target in list(const.output(0).get_target_inputs()):
            target.replace_source_output(new.output(0))
    model.validate_nodes_and_infer_types()
    return model


class _Spill:
    """Fused weights written to one file as they are made, then read back through a shared map; the file is
    unlinked once mapped (nothing is left behind, its space comes back with the map)."""

    def __init__(self, folder: Path):
        try:
            fd, self.path = tempfile.mkstemp(prefix="lora-fused-", suffix=".bin", dir=folder)
            self.file = os.fdopen(fd, "wb")
        except OSError:
            self.file, self.path = None, None  # held in memory instead
        self.at = 0

    def add(self, arr: np.ndarray) -> tuple:
        """Write `arr`; -> where it is (offset, shape, dtype)."""
        self.at += -self.at % 64  # aligned for the plugin
        self.file.seek(self.at)
        try:
            self.file.write(memoryview(np.ascontiguousarray(arr)).cast("B"))
        except OSError as e:
            raise RuntimeInputError(f"fuse_lora: cannot write the fused weights to {self.path} "
                                    f"({e.strerror or e})") from None  # fmt: skip
        where = (self.at, arr.shape, arr.dtype)
        self.at += arr.nbytes
        return where

    def mapped(self, fused: list, spilled: list | None) -> list:
        self.file.close()
        mapped = np.memmap(self.path, dtype=np.uint8, mode="r+")  # shared (OpenVINO takes writable arrays only)
        if spilled is not None:
            spilled.append(self.path)
        return [(const, mapped[at:at + int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape))
                for const, (at, shape, dtype) in fused]  # fmt: skip

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            os.unlink(self.path)
            self.file = None
