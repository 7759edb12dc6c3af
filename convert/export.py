"""Trace one submodel with ov.convert_model, compress its weights, save it, and check it against torch."""

from __future__ import annotations

import gc
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openvino as ov
import torch

from convert.errors import ConvertError
from convert.wrappers import Spec

WEIGHT_FORMATS = ("fp16", "fp32", "int8", "int4")
INT4_GROUP_SIZE = 64
# Accepted max |OV - torch| as a fraction of max |torch| (fp32 also gets an absolute 1e-4 floor).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "int8": 0.15, "int4": 0.5}


@dataclass
class ExportResult:
    name: str
    params: int
    seconds: float
    bytes_on_disk: int
    max_abs_diff: float
    ref_max_abs: float
    tolerance: float

    def line(self) -> str:
        return (
            f"{self.name:15s} {self.params / 1e6:9.2f} M params  {self.seconds:7.1f} s  "
            f"{self.bytes_on_disk / 2**20:9.1f} MiB  max|diff| {self.max_abs_diff:.2e} "
            f"(max|ref| {self.ref_max_abs:.2e}, tolerance {self.tolerance:.2e})"
        )


def _outputs(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def _compress(model: ov.Model, weight_format: str) -> ov.Model:
    if weight_format not in ("int8", "int4"):
        return model
    import nncf

    if weight_format == "int8":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    # int4: MatMul weights in symmetric int4, groups of 64 along the input channels; NNCF keeps the
    # embeddings, convolutions and the last layer in int8 (backup mode) where int4 would hurt most.
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=INT4_GROUP_SIZE, ratio=1.0)


def export(name: str, spec: Spec, out_dir: Path, weight_format: str, core: ov.Core) -> ExportResult:
    """Convert `spec.module` to out_dir/openvino_model.xml; raise ConvertError if OV disagrees with torch."""
    t0 = time.perf_counter()
    module = spec.module
    params = sum(p.numel() for p in module.parameters())
    with torch.no_grad():
        ref = [o.float().numpy() for o in _outputs(module(*spec.inputs.values()))]
        if len(ref) != len(spec.outputs):
            raise RuntimeError(f"{name}: wrapper returned {len(ref)} outputs, spec names {len(spec.outputs)}")
        half = next(module.parameters()).dtype in (torch.float16, torch.bfloat16)
        if half:  # trace 16-bit weights without upcasting them all in memory first
            from openvino.frontend.pytorch.patch_model import __make_16bit_traceable as make_traceable

            make_traceable(module)
            example = tuple(v.float() if v.is_floating_point() else v for v in spec.inputs.values())
        else:
            example = tuple(spec.inputs.values())
        shapes = [ov.PartialShape(spec.dynamic[k]) for k in spec.inputs]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python branches
            ov_model = ov.convert_model(module, example_input=example, input=shapes)
    for port, input_name in zip(ov_model.inputs, spec.inputs, strict=True):
        port.get_tensor().set_names({input_name})
    for port, output_name in zip(ov_model.outputs, spec.outputs, strict=True):
        port.get_tensor().set_names({output_name})
    ov_model = _compress(ov_model, weight_format)
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / "openvino_model.xml"
    ov.save_model(ov_model, xml, compress_to_fp16=weight_format != "fp32")
    del ov_model, module, spec.module
    gc.collect()

    # Check what was written, as the runtime will read it, in f32 arithmetic.
    compiled = core.compile_model(core.read_model(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled({k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in spec.inputs.items()})
    diff = max(float(np.abs(got[compiled.output(n)] - r).max()) for n, r in zip(spec.outputs, ref, strict=True))
    ref_max = max(float(np.abs(r).max()) for r in ref)
    del compiled, got
    gc.collect()
    tol = TOLERANCE[weight_format] * ref_max + (1e-4 if weight_format == "fp32" else 0.0)
    size = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
    result = ExportResult(name, params, time.perf_counter() - t0, size, diff, ref_max, tol)
    if not diff <= tol:  # also catches NaN
        raise ConvertError(f"{name}: OpenVINO output differs from torch by {diff:.3e} > tolerance {tol:.3e}")
    return result
