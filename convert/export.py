"""Trace one submodel with ov.convert_model, compress its weights and save it (checked by convert.check)."""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path

import numpy as np
import openvino as ov
import torch

from convert.check import CHECK_FILE
from convert.wrappers import Spec

INT4_GROUP_SIZE = 64


def _outputs(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def compress(model: ov.Model, weight_format: str, unet: bool) -> ov.Model:
    if weight_format not in ("int8", "int4"):
        return model
    import nncf

    if weight_format == "int8" or not unet:  # int4 is for the UNet; text encoders and VAE get int8
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    # int4: MatMul weights in symmetric int4, groups of 64 along the input channels (a smaller power of two, at
    # least 16, where 64 does not divide the channels; else int8); NNCF keeps the embeddings, convolutions and
    # the last layer in int8 (backup mode) where int4 would hurt most.
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    advanced = AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST,
                                             min_adjusted_group_size=16)  # fmt: skip
    mode = nncf.CompressWeightsMode.INT4_SYM
    return nncf.compress_weights(model, mode=mode, group_size=INT4_GROUP_SIZE, ratio=1.0, advanced_parameters=advanced)


@contextlib.contextmanager
def _traceable_16bit(module: torch.nn.Module, half: bool):
    """Trace 16-bit weights without upcasting them all in memory first (OpenVINO's patch), then undo the patch:
    besides the module it replaces torch.bmm process-wide with a tracing stub that returns a constant tensor, and
    nothing else restores it (a later torch.bmm in this process, diffusers' classic attention for one, would
    compute 0.5s)."""
    if not half:
        yield
        return
    from openvino.frontend.pytorch import patch_model as patch

    patch.__make_16bit_traceable(module)
    try:
        yield
    finally:
        patch.unpatch_model(module, "_openvino_module_extension_patch_orig_forward")


def trace(spec: Spec, out_dir: Path, weight_format: str) -> dict:
    """Trace spec.module, compress, save out_dir/openvino_model.xml; keep inputs and torch outputs for check().
    (int4 compresses the UNet's MatMuls to 4 bits; the other submodels get int8 with it.)"""
    t0 = time.perf_counter()
    module = spec.module
    params = sum(p.numel() for p in module.parameters())
    with torch.no_grad():
        ref = [o.float().numpy() for o in _outputs(module(*spec.inputs.values()))]
        if len(ref) != len(spec.outputs):
            raise RuntimeError(f"wrapper returned {len(ref)} outputs, spec names {len(spec.outputs)}")
        half = next(module.parameters()).dtype in (torch.float16, torch.bfloat16)
        example = tuple(v.float() if half and v.is_floating_point() else v for v in spec.inputs.values())
        shapes = [ov.PartialShape(spec.dynamic[k]) for k in spec.inputs]
        with warnings.catch_warnings(), _traceable_16bit(module, half):
            warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python branches
            ov_model = ov.convert_model(module, example_input=example, input=shapes)
    for port, input_name in zip(ov_model.inputs, spec.inputs, strict=True):
        port.get_tensor().set_names({input_name})
    for port, output_name in zip(ov_model.outputs, spec.outputs, strict=True):
        port.get_tensor().set_names({output_name})
    ov_model = compress(ov_model, weight_format, unet="out_sample" in spec.outputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov_model, out_dir / "openvino_model.xml", compress_to_fp16=weight_format != "fp32")
    arrays = {f"in:{k}": (v.float() if v.is_floating_point() else v).numpy() for k, v in spec.inputs.items()}
    arrays |= {f"out:{k}": r for k, r in zip(spec.outputs, ref, strict=True)}
    np.savez(out_dir / CHECK_FILE, **arrays)
    return {"params": params, "seconds": time.perf_counter() - t0}
