"""benchmarks.flops: the UNet's FLOPs per call from its IR, against torch's FlopCounterMode on the diffusers UNet
and against the formula on a hand-made model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

from benchmarks.flops import achieved, call_shapes, count, unet_flops, unet_xml
from tests.models import ROOT


@pytest.mark.parametrize("kind", ["base", "lcm", "refiner"])
def test_unet_flops_equal_torchs_count(tiny, kind):
    """Exactly torch.utils.flop_counter's count of the diffusers forward at the same shapes. Both count 2 x the
    multiply-accumulates of matmuls (torch: mm/addmm/bmm/baddbmm; bias adds not counted in either) and of
    convolutions (out elements x Cin/groups x kernel area). The classic attention processor (baddbmm + softmax
    + bmm) is set because torch has no formula for the CPU kernel of scaled_dot_product_attention
    (_scaled_dot_product_flash_attention_for_cpu) and would count no attention at all; its two bmm are the
    IR's ScaledDotProductAttention ops."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    src, folder = tiny(kind)
    xml = unet_xml(folder)
    shapes = call_shapes(xml, 64, 96, batch=2)
    assert shapes["sample"] == [2, 4, 8, 12] and shapes["encoder_hidden_states"][:2] == [2, 77]
    ours = unet_flops(xml, shapes)
    assert ours["ops"]["ScaledDotProductAttention"] > 0 and ours["ops"]["Convolution"] > 0

    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet").eval()
    unet.set_attn_processor(AttnProcessor())
    gen = torch.Generator().manual_seed(0)
    x = {k: torch.randn(v, generator=gen) for k, v in shapes.items() if k != "timestep"}
    kw = dict(sample=x["sample"], timestep=torch.tensor([500.0]), encoder_hidden_states=x["encoder_hidden_states"],
              added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]},
              timestep_cond=x.get("timestep_cond"))  # fmt: skip
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(**kw)
    assert ours["flops"] == counter.get_total_flops(), (ours["by_op"], counter.get_flop_counts()["Global"])
    by_torch = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert ours["by_op"]["Convolution"] == by_torch["aten.convolution"]
    assert ours["by_op"]["ScaledDotProductAttention"] == by_torch["aten.baddbmm"] + by_torch["aten.bmm"]


def test_flops_of_a_hand_made_model_follow_the_formula():
    rng = np.random.default_rng(0)
    x = ops.parameter([-1, 3, -1, -1], ov.Type.f32, name="x")
    conv = ops.convolution(x, ops.constant(rng.standard_normal((8, 3, 3, 3), np.float32)), [2, 2], [1, 1], [1, 1],
                           [1, 1])  # fmt: skip
    group = ops.group_convolution(conv, ops.constant(rng.standard_normal((4, 2, 2, 1, 1), np.float32)), [1, 1],
                                  [0, 0], [0, 0], [1, 1])  # fmt: skip
    flat = ops.reshape(group, ops.constant(np.array([0, 8, -1], np.int64)), special_zero=True)  # [N, 8, HW]
    mm = ops.matmul(flat, ops.constant(rng.standard_normal((5, 8), np.float32)), True, True)  # [N, HW, 5]
    q = ops.unsqueeze(mm, ops.constant(np.array([1], np.int64)))  # [N, 1, HW, 5]
    y = ops.parameter([-1, 1, 7, 6], ov.Type.f32, name="y")  # keys [N, 1, 7, 5] and values [N, 1, 7, 6]
    k = ops.slice(y, ops.constant(np.array([0], np.int64)), ops.constant(np.array([5], np.int64)),
                  ops.constant(np.array([1], np.int64)), ops.constant(np.array([3], np.int64)))  # fmt: skip
    sdpa = ops.scaled_dot_product_attention(q, k, y, causal=False)
    model = ov.Model([sdpa], [x, y])
    got = unet_flops(model, {"x": [2, 3, 16, 20], "y": [2, 1, 7, 6], "unused": [1]})
    n, h, w = 2, 8, 10  # the stride-2 conv's output
    want = {
        "Convolution": 2 * (n * 8 * h * w) * 3 * 3 * 3,  # out elements x Cin x kernel area
        "GroupConvolution": 2 * (n * 8 * h * w) * 2 * 1 * 1,  # x Cin/groups x kernel area
        "MatMul": 2 * (n * h * w * 5) * 8,  # out elements x the contracted dim (transpose_a)
        "ScaledDotProductAttention": 2 * n * (h * w) * 7 * 5 + 2 * n * (h * w) * 7 * 6,
    }  # QK^T + scores x V
    assert got["by_op"] == want and got["flops"] == sum(want.values())
    assert got["ops"] == dict.fromkeys(want, 1) and got["shapes"] == {"x": [2, 3, 16, 20], "y": [2, 1, 7, 6]}
    assert "2 x multiply-accumulates" in got["method"]
    assert count(model)["flops"] == got["flops"]  # already static now: reshaped in place
    rec = achieved(got, [0.5, 0.25, 2.0])  # median 0.5 s
    assert rec["unet_achieved_gflops"] == got["gflop"] / 0.5 and rec["unet_gflop_per_call"] == got["gflop"]
    from benchmarks.flops import FlopsError

    with pytest.raises(FlopsError, match="no shape given for the UNet input.s. y"):
        unet_flops(ov.Model([sdpa], [x, y]), {"x": [2, 3, 16, 20]})


def test_a_failed_count_is_a_warning_not_a_lost_benchmark(tmp_path, capsys):
    from benchmarks.flops import counted

    assert counted(unet_flops, tmp_path / "missing.xml", {}) is None
    why = f"{tmp_path / 'missing.xml'}: no OpenVINO IR there (.xml with its .bin)"
    assert capsys.readouterr().err == f"warning: the UNet's FLOPs not counted: {why}\n"


def test_cli_prints_the_table(tiny):
    folder = tiny("base")[1]
    cmd = [sys.executable, "-m", "benchmarks.flops", str(folder), "--size", "64", "--batch", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "sample [1, 4, 8, 8]" in proc.stdout and "| ScaledDotProductAttention |" in proc.stdout
    assert "| total |" in proc.stdout and "method: 2 x multiply-accumulates" in proc.stdout
    for bad in ([str(folder / "missing")], [str(folder), "--size", "60"]):
        proc = subprocess.run([*cmd[:3], *bad], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
