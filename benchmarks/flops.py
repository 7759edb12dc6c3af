"""The UNet's FLOPs per call, counted from its OpenVINO IR at the call's static shapes, and its achieved GFLOP/s.

Next to the day's MatMul GFLOP/s (benchmarks.machine), the achieved GFLOP/s of a UNet call (its FLOPs / its
measured seconds) makes figures from different days comparable and shows the distance to the machine's limit.
The IR is read (the weights stay memory-mapped, untouched) and reshaped to static shapes; nothing is compiled.

    python -m benchmarks.flops FOLDER [--size 512] [--batch 2]     # FOLDER: a model folder, its unet/ or an .xml
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

METHOD = ("2 x multiply-accumulates of the MatMul, Convolution, GroupConvolution and ScaledDotProductAttention "
          "(QK^T and scores x V) ops of the OpenVINO IR at the call's static shapes; bias adds, element-wise ops, "
          "norms, softmax and resampling not counted")  # fmt: skip
COUNTED = ("Convolution", "GroupConvolution", "MatMul", "ScaledDotProductAttention")


class FlopsError(ValueError):
    """A model or shape this count cannot handle (one line)."""


def _static(pshape, what: str) -> list[int]:
    if not pshape.is_static:
        raise FlopsError(f"{what}: shape {pshape} is not static (give every input of the IR a static shape)")
    return [int(d) for d in pshape.to_shape()]


def _op_flops(op) -> int:
    """2 x the multiply-accumulates of one op (its shapes static)."""
    kind, name = op.get_type_name(), op.get_friendly_name()
    out = _static(op.get_output_partial_shape(0), name)
    if kind in ("Convolution", "GroupConvolution"):
        # weight [Cout, Cin, k...] or [G, Cout/G, Cin/G, k...]: each output element sums Cin/G x kernel area
        w = _static(op.input(1).get_partial_shape(), name)
        per_output = math.prod(w[1:]) if kind == "Convolution" else math.prod(w[2:])
        return 2 * math.prod(out) * per_output
    if kind == "MatMul":
        a = _static(op.input(0).get_partial_shape(), name)
        k = a[0] if len(a) == 1 else a[-2] if op.get_attributes()["transpose_a"] else a[-1]
        return 2 * math.prod(out) * k
    # ScaledDotProductAttention: Q [..., L, E], K [..., S, E], V [..., S, Ev] -> [..., L, Ev]
    q, key = (_static(op.input(i).get_partial_shape(), name) for i in (0, 1))
    rows, s = math.prod(out[:-1]), key[-2]  # batch x heads x L
    return 2 * rows * s * q[-1] + 2 * rows * s * out[-1]


def count(model) -> dict:
    """FLOPs of a model whose shapes are static: {"flops", "gflop", "by_op": {type: flops}, "ops": {type: n}}."""
    by_op: dict[str, int] = {}
    ops: dict[str, int] = {}
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind in COUNTED:
            by_op[kind] = by_op.get(kind, 0) + _op_flops(op)
            ops[kind] = ops.get(kind, 0) + 1
    total = sum(by_op.values())
    return {"flops": total, "gflop": total / 1e9, "by_op": by_op, "ops": ops, "method": METHOD}


def _read(xml_or_model):
    import openvino as ov

    if isinstance(xml_or_model, ov.Model):
        return xml_or_model
    xml = Path(xml_or_model)
    if not xml.is_file() or not xml.with_suffix(".bin").is_file():
        raise FlopsError(f"{xml}: no OpenVINO IR there (.xml with its .bin)")
    return ov.Core().read_model(xml)  # the .bin is memory-mapped: the weights are not read


def unet_flops(xml_or_model, input_shapes: dict) -> dict:
    """FLOPs of one UNet call at `input_shapes` (input name -> static shape; names the IR lacks are ignored,
    e.g. timestep_cond for a UNet without it). An ov.Model is reshaped in place. -> count()'s dict + "shapes"."""
    import openvino as ov

    model = _read(xml_or_model)
    names = [p.get_any_name() for p in model.inputs]
    missing = [n for n in names if n not in input_shapes]
    if missing:
        raise FlopsError(f"no shape given for the UNet input(s) {', '.join(missing)}")
    shapes = {n: [int(d) for d in input_shapes[n]] for n in names}
    model.reshape({n: ov.PartialShape(s) for n, s in shapes.items()})
    return count(model) | {"shapes": shapes}


def unet_flops_at(xml_or_model, height: int, width: int, batch: int) -> dict:
    """FLOPs of one UNet call at this image size and batch (call_shapes), the IR read once."""
    model = _read(xml_or_model)
    return unet_flops(model, call_shapes(model, height, width, batch))


def counted(fn, *args) -> dict | None:
    """fn(*args), or None with a one-line warning: a benchmark keeps its measurements when the count fails."""
    try:
        return fn(*args)
    except (FlopsError, RuntimeError, OSError) as e:
        print(f"warning: the UNet's FLOPs not counted: {(str(e).splitlines() or [type(e).__name__])[0]}",
              file=sys.stderr)  # fmt: skip
        return None


def call_shapes(xml_or_model, height: int, width: int, batch: int, tokens: int = 77) -> dict[str, list[int]]:
    """A UNet call's input shapes from the IR's inputs, as the runtime feeds it (runtime.denoise): batch rows
    (2 x images under guidance), the latent at height/8 x width/8, `tokens` text tokens; the IR's static dims
    as declared; a timestep's dynamic dims are 1 (UNetDenoiser.timestep_shape)."""
    model = _read(xml_or_model)
    out = {}
    for port in model.inputs:
        name, ps = port.get_any_name(), port.get_partial_shape()
        if ps.rank.is_dynamic:
            if name != "timestep":
                raise FlopsError(f"UNet input {name}: dynamic rank")
            out[name] = [1]
            continue
        dims = []
        for i, d in enumerate(ps):
            if d.is_static:
                dims.append(d.get_length())
            elif name == "timestep":
                dims.append(1)
            elif i == 0:
                dims.append(batch)
            elif name == "sample" and i in (2, 3):
                dims.append((height if i == 2 else width) // 8)
            elif name == "encoder_hidden_states" and i == 1:
                dims.append(tokens)
            else:
                raise FlopsError(f"UNet input {name}: dimension {i} is dynamic in the IR ({ps}); give its shape")
        out[name] = dims
    return out


def unet_xml(path) -> Path:
    """A model folder, its unet/ folder or the .xml itself -> the UNet IR's path."""
    path = Path(path)
    for xml in (path, path / "openvino_model.xml", path / "unet" / "openvino_model.xml"):
        if xml.suffix == ".xml" and xml.is_file():
            return xml
    raise FlopsError(f"{path}: no UNet IR (unet/openvino_model.xml)")


def achieved(flops: dict, call_seconds) -> dict:
    """The record's fields: FLOPs per call (with the method) and achieved GFLOP/s = FLOPs / the median call's
    seconds."""
    median = statistics.median(call_seconds)
    return {"unet_gflop_per_call": flops["gflop"], "unet_flops_method": flops["method"],
            "unet_achieved_gflops": flops["gflop"] / median}  # fmt: skip


def figures_line(rec: dict) -> str:
    """One printed line with both figures of a record (or a part of one)."""
    return (f"UNet {rec['unet_gflop_per_call']:.1f} GFLOP per call, achieved "
            f"{rec['unet_achieved_gflops']:.1f} GFLOP/s (FLOPs / median call seconds)")  # fmt: skip


def table(flops: dict) -> str:
    lines = ["| op | count | GFLOP | share |", "|---|---:|---:|---:|"]
    for kind, f in sorted(flops["by_op"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {flops['ops'][kind]} | {f / 1e9:.4g} | {f / max(flops['flops'], 1) * 100:.1f} % |")
    lines.append(f"| total | {sum(flops['ops'].values())} | {flops['gflop']:.4g} | 100 % |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.flops", description=__doc__.split("\n")[0])
    p.add_argument("folder", help="a converted model folder, its unet/ folder or the UNet's .xml")
    p.add_argument("--size", type=int, default=1024, help="image size (the latent is size/8)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image under guidance)")
    p.add_argument("--tokens", type=int, default=77, help="text tokens (encoder_hidden_states' length)")
    args = p.parse_args(argv)
    if args.size <= 0 or args.size % 8 or args.batch < 1 or args.tokens < 1:
        print("error: --size must be a positive multiple of 8, --batch and --tokens at least 1", file=sys.stderr)
        return 2
    try:
        model = _read(unet_xml(args.folder))
        shapes = call_shapes(model, args.size, args.size, args.batch, args.tokens)
        flops = unet_flops(model, shapes)
    except (FlopsError, RuntimeError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"{unet_xml(args.folder)}: one call at " + ", ".join(f"{k} {v}" for k, v in shapes.items()))
    print(table(flops))
    print(f"{flops['gflop']:.4g} GFLOP = {flops['gflop'] / 2e3:.4g} T multiply-accumulates per call; method: {METHOD}")
    layers = flops["flops"] - flops["by_op"].get("ScaledDotProductAttention", 0)
    # what counters hooking nn.Linear / nn.Conv2d modules report (DeepCache's SDXL figure, 149.4 T MACs for 50
    # batch-1 calls at 1024 x 1024, is this count)
    print(f"without attention's QK^T and scores x V (layer counters): {layers / 2e12:.4g} T multiply-accumulates")
    return 0


if __name__ == "__main__":
    sys.exit(main())
