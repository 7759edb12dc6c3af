"""LoRA graph surgery on small graphs: branches grafted beside a layer (runtime/lora.py) and adapters fused into its
weight (runtime/lora_fuse.py), each against the fused weight computed in numpy."""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest
from openvino import opset13 as ops

from runtime.errors import RuntimeInputError
from runtime.lora_files import Layer


def test_graft_on_compressed_weights():
    """int8/int4 folders: the branch reads a layer's input and adds to its output, the decompressed weight
    (u8 constant -> Convert -> Subtract -> Multiply, as NNCF writes it) untouched; equals the fused weight
    W + B @ A for a Linear and a strided, padded 3x3 convolution (LoCon)."""
    from runtime.lora import graft
    from runtime.lora_layers import targets

    rng = np.random.default_rng(0)

    def decompressed(shape):
        q = ops.constant(rng.integers(0, 255, shape).astype(np.uint8))
        w = ops.multiply(ops.subtract(ops.convert(q, "f32"), ops.constant(np.float32(128))),
                         ops.constant(np.float32(0.01)))  # fmt: skip
        return w, (q.get_data().astype(np.float32) - 128) * np.float32(0.01)

    def build(fused=None):
        x = ops.parameter([2, 3, 10, 10], np.float32, name="x")
        (wc, wc_np), (wl, wl_np) = decompressed((4, 3, 3, 3)), decompressed((6, 5))
        if fused is not None:
            wc, wl = ops.constant(fused[0]), ops.constant(fused[1])
        conv = ops.convolution(x, wc, [2, 2], [1, 1], [1, 1], [1, 1])
        conv.set_friendly_name("__module.model.blk.conv/aten::_convolution/Convolution")
        lin = ops.matmul(conv, wl, False, True)
        lin.set_friendly_name("__module.model.blk.proj/ov_ext::linear/MatMul")  # the fp16 converter's name
        return ov.Model([lin], [x]), (wc_np, wl_np)

    rng = np.random.default_rng(0)
    model, (wc, wl) = build()
    table = targets(model, "unet")
    assert {k: v[1:] for k, v in table.items()} == {"blk.conv": ("conv", (4, 3, 3, 3)), "blk.proj": ("linear", (6, 5))}
    graft(model, table, ["blk.conv", "blk.proj"], {"blk.conv": 2})
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    lora = {
        "lora_a.0": rng.standard_normal((2, 3, 3, 3)),
        "lora_b.0": rng.standard_normal((4, 2, 1, 1)),
        "lora_a.1": rng.standard_normal((3, 5)),
        "lora_b.1": rng.standard_normal((6, 3)),
        "lora_s.0": np.array([0.5, 2.0]),
        "lora_s.1": np.array([1.5, -1.0, 0.25]),
    }  # each rank column's scale
    lora = {k: v.astype(np.float32) for k, v in lora.items()}
    x = rng.standard_normal((2, 3, 10, 10)).astype(np.float32)
    out = compiled({"x": x, **lora})[0]
    fused_conv = wc + np.einsum("or,r,rikl->oikl", lora["lora_b.0"][:, :, 0, 0], lora["lora_s.0"], lora["lora_a.0"])
    fused_lin = wl + lora["lora_b.1"] @ np.diag(lora["lora_s.1"]) @ lora["lora_a.1"]
    rng = np.random.default_rng(0)
    ref_model, _ = build((fused_conv.astype(np.float32), fused_lin.astype(np.float32)))
    ref = ov.Core().compile_model(ref_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({"x": x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert np.abs(ref).max() > 1


def test_bf16_bits_are_openvinos():
    """as_bf16 rounds float32 to bfloat16 as OpenVINO's Convert does (to nearest, ties to even)."""
    from runtime.lora import as_bf16

    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 1e3
    x[:4] = [1.0, -2.5, 1 + 2**-8, 1 + 3 * 2**-8]  # the last two halfway between two bfloat16 values
    p = ov.opset13.parameter([x.size], ov.Type.f32, name="x")
    m = ov.Model([ov.opset13.convert(ov.opset13.convert(p, ov.Type.bf16), ov.Type.f32)], [p])
    want = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({"x": x})[0]
    got = (as_bf16(x).astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(got, want)
    assert as_bf16(x[:4]).tolist() == [0x3F80, 0xC020, 0x3F80, 0x3F82]


def test_graft_adds_a_geglu_projections_branch_after_its_split():
    """GEGLU's projection (ff.net.0.proj) is split in two halves right after it: each half's branch (B's rows
    split alike) is added after the split, where the add joins GEGLU's element-wise subgraph; equals the fused
    weight W + B @ diag(s) @ A."""
    from runtime.lora import graft
    from runtime.lora_layers import targets

    rng = np.random.default_rng(1)
    w, bias = rng.standard_normal((8, 6)).astype(np.float32), rng.standard_normal(8).astype(np.float32)

    def build(weight):
        x = ops.parameter([2, 5, 6], np.float32, name="x")
        lin = ops.matmul(x, ops.constant(weight), False, True)
        lin.set_friendly_name("__module.model.blk.ff.net.0.proj/ov_ext::linear/MatMul")
        y = ops.add(lin, ops.constant(bias))
        half = ops.divide(ops.gather(ops.shape_of(y), ops.constant(np.int64(-1)), ops.constant(np.int64(0))),
                          ops.constant(np.int64(2)))  # fmt: skip
        lengths = ops.concat([ops.unsqueeze(half, ops.constant(np.int64(0)))] * 2, 0)  # as torch's chunk traces
        h, g = ops.variadic_split(y, ops.constant(np.int64(-1)), lengths).outputs()
        return ov.Model([ops.multiply(h, ops.gelu(g, "erf"))], [x])

    model = build(w)
    graft(model, targets(model, "unet"), ["blk.ff.net.0.proj"], {})
    names = {op.get_friendly_name() for op in model.get_ops()}
    assert {"lora.0.up0", "lora.0.up1", "lora.0.add0", "lora.0.add1"} <= names and "lora.0.add" not in names
    lora = {"lora_a.0": rng.standard_normal((3, 6)), "lora_b.0": rng.standard_normal((8, 3)),
            "lora_s.0": np.array([0.5, -2.0, 1.25])}  # fmt: skip
    lora = {k: v.astype(np.float32) for k, v in lora.items()}
    x = rng.standard_normal((2, 5, 6)).astype(np.float32)
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    out = ov.Core().compile_model(model, "CPU", f32)({"x": x, **lora})[0]
    fused = w + lora["lora_b.0"] @ np.diag(lora["lora_s.0"]) @ lora["lora_a.0"]
    ref = ov.Core().compile_model(build(fused), "CPU", f32)({"x": x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    plain = ov.Core().compile_model(build(w), "CPU", f32)({"x": x})[0]
    assert np.abs(ref - plain).max() > 0.5


def _layer(rng, out: int, inp: int, rank: int, kernel=()) -> Layer:
    down = rng.standard_normal((rank, inp, *kernel)).astype(np.float32)
    up = rng.standard_normal((out, rank, *[1] * len(kernel))).astype(np.float32)
    return Layer("unet", "m", False, "m.lora_A.weight", down=down, up=up)


def test_fuse_bakes_the_adapters_into_the_weights():
    """fuse_lora's graph surgery: each layer's weight constant becomes W + sum of scale x B @ A (two adapters, a
    strided 3x3 convolution with a LoCon pair, a Linear stored [out, in] in fp16 and one stored [in, out] in f32),
    in the constant's own type; equals the weights fused in numpy."""
    from runtime.lora_fuse import fuse, weight_constant
    from runtime.lora_layers import targets

    rng = np.random.default_rng(2)
    wc = rng.standard_normal((4, 3, 3, 3)).astype(np.float16)
    w1, w2 = rng.standard_normal((6, 4)).astype(np.float16), rng.standard_normal((6, 5)).astype(np.float32)

    def build(wc, w1, w2):
        x = ops.parameter([2, 3, 10, 10], np.float32, name="x")
        conv = ops.convolution(x, ops.convert(ops.constant(wc), "f32"), [2, 2], [1, 1], [1, 1], [1, 1])
        conv.set_friendly_name("__module.model.blk.conv/aten::_convolution/Convolution")
        t = ops.transpose(conv, ops.constant(np.array([0, 2, 3, 1], np.int64)))
        lin1 = ops.matmul(t, ops.convert(ops.constant(w1), "f32"), False, True)
        lin1.set_friendly_name("__module.model.blk.a/ov_ext::linear/MatMul")
        lin2 = ops.matmul(lin1, ops.constant(w2), False, False)  # a weight stored [in, out]
        lin2.set_friendly_name("__module.model.blk.b/aten::linear/MatMul")
        return ov.Model([lin2], [x])

    model = build(wc, w1, w2)
    table = targets(model, "unet")
    assert {k: v[1:] for k, v in table.items()} == {"blk.conv": ("conv", (4, 3, 3, 3)), "blk.a": ("linear", (6, 4)),
                                                    "blk.b": ("linear", (5, 6))}  # fmt: skip
    terms = {
        "blk.conv": [(_layer(rng, 4, 3, 2, (3, 3)), 0.5), (_layer(rng, 4, 3, 1, (3, 3)), -0.25)],
        "blk.a": [(_layer(rng, 6, 4, 3), 0.125)],
        "blk.b": [(_layer(rng, 5, 6, 2), 0.3), (_layer(rng, 5, 6, 4), 1.5)],
    }

    def delta(terms):
        return sum(s * np.tensordot(x.up.reshape(x.up.shape[:2]), x.down, axes=1) for x, s in terms)

    fuse(model, table, terms)
    layers = {v[0] for v in table.values()}
    kept = sorted(weight_constant(op).get_element_type().get_type_name() for op in model.get_ops()
                  if op.get_friendly_name() in layers)  # fmt: skip
    assert kept == ["f16", "f16", "f32"]  # each weight in its own type
    ref = build(
        (wc.astype(np.float32) + delta(terms["blk.conv"])).astype(np.float16),
        (w1.astype(np.float32) + delta(terms["blk.a"])).astype(np.float16),
        w2 + delta(terms["blk.b"]).T,
    )
    x = rng.standard_normal((2, 3, 10, 10)).astype(np.float32)
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    out = ov.Core().compile_model(model, "CPU", f32)({"x": x})[0]
    want = ov.Core().compile_model(ref, "CPU", f32)({"x": x})[0]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
    plain = ov.Core().compile_model(build(wc, w1, w2), "CPU", f32)({"x": x})[0]
    assert np.abs(want - plain).max() > 1


def test_fuse_refuses_compressed_weights():
    """A weight-compressed layer (int8: u8 constant -> Convert -> Subtract -> Multiply) has no float constant to
    fuse into: one line naming the layer; its adapters run as branches instead."""
    from runtime.lora_fuse import check_fusable, fuse
    from runtime.lora_layers import targets

    q = ops.constant(np.random.default_rng(0).integers(0, 255, (6, 5)).astype(np.uint8))
    w = ops.multiply(ops.subtract(ops.convert(q, "f32"), ops.constant(np.float32(128))), ops.constant(np.float32(0.01)))
    x = ops.parameter([2, 5], np.float32, name="x")
    lin = ops.matmul(x, w, False, True)
    lin.set_friendly_name("__module.model.blk.proj/ov_ext::linear/MatMul")
    model = ov.Model([lin], [x])
    table = targets(model, "unet")
    with pytest.raises(RuntimeInputError, match=r"^fuse_lora: the UNet's blk.proj has a compressed weight"):
        check_fusable(model, table, ["blk.proj"], "the UNet")
    with pytest.raises(RuntimeInputError, match="blk.proj has a compressed weight"):
        fuse(model, table, {"blk.proj": [(_layer(np.random.default_rng(1), 6, 5, 2), 1.0)]})


def test_fused_weights_are_file_mapped(tmp_path):
    """With a spill folder the fused weights are written there and read back through a map of the file, which is
    unlinked at once (nothing left behind); the map's pages can be dropped after the compile (OpenVINO's compiled
    model may keep the constants it was compiled from) and read back: the model still computes the fused layer."""
    from runtime.lora_fuse import fuse
    from runtime.lora_layers import targets
    from runtime.ov_model import drop_mapped_pages

    rng = np.random.default_rng(3)
    w = rng.standard_normal((512, 256)).astype(np.float16)

    def build(weight):
        x = ops.parameter([4, 256], np.float32, name="x")
        lin = ops.matmul(x, ops.convert(ops.constant(weight), "f32"), False, True)
        lin.set_friendly_name("__module.model.blk.proj/ov_ext::linear/MatMul")
        return ov.Model([lin], [x])

    model, layer = build(w), _layer(rng, 512, 256, 8)
    spilled = []
    fuse(model, targets(model, "unet"), {"blk.proj": [(layer, 0.5)]}, tmp_path, spilled)
    assert list(tmp_path.iterdir()) == [] and len(spilled) == 1 and spilled[0].startswith(str(tmp_path))
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(model, "CPU", f32)
    x = rng.standard_normal((4, 256)).astype(np.float32)
    want = ov.Core().compile_model(build((w + 0.5 * layer.up @ layer.down).astype(np.float16)), "CPU", f32)({"x": x})[0]
    np.testing.assert_allclose(compiled({"x": x})[0], want, rtol=1e-5, atol=1e-4)
    assert drop_mapped_pages(*spilled) >= w.nbytes  # the unlinked file's map (the model holds it), dropped
    np.testing.assert_allclose(compiled({"x": x})[0], want, rtol=1e-5, atol=1e-4)
    again = ov.Core().compile_model(model, "CPU", f32)  # its pages come back from the file where read again
    np.testing.assert_allclose(again({"x": x})[0], want, rtol=1e-5, atol=1e-4)
