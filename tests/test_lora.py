"""LoRA fusing: our converted pipeline with a LoRA fused gives what diffusers gives with load_lora_weights +
fuse_lora, for the diffusers/PEFT and kohya key formats; bad LoRAs are one-line errors."""

from __future__ import annotations

import re

import pytest
import torch

from convert.errors import ConvertError
from convert.lora import apply_loras, check_loras
from convert.pipeline import convert_pipeline
from tests import cli, parity
from tests.models import source_dir

SMALL = dict(prompt="a photo of a cat", negative_prompt="blurry", height=192, width=256, num_inference_steps=4)
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def _fresh_pipe(kind: str):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(source_dir(kind), dtype=torch.float32, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _random_lora(pipe, components, seed: int) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """{component: {module: (down [r, in, (k, k)], up [out, r, (1, 1)])}} for every Linear/Conv2d (3x3 convs
    included); rank 4, rank 2 for conv2/fc2; deltas of the weights' own size."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for component in components:
        layers = {}
        for name, m in getattr(pipe, component).named_modules():
            if isinstance(m, torch.nn.Linear | torch.nn.Conv2d):
                w = m.weight
                r = 2 if name.endswith(("conv2", "fc2")) else 4
                down = torch.randn((r, *w.shape[1:]), generator=g) / w[0].numel() ** 0.5
                up = torch.randn((w.shape[0], r, *[1] * (w.ndim - 2)), generator=g) * w.std() * 2 / r**0.5
                layers[name] = (down, up)
        lora[component] = layers
    return lora


def _save_peft(lora, path):
    """diffusers' save_lora_weights with peft LoraConfig metadata: alpha 6 on rank 4 (2 on conv2/fc2), and an
    alpha_pattern; what diffusers' training scripts write."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig

    kwargs = {}
    for component, layers in lora.items():
        names = sorted(layers)
        config = LoraConfig(r=4, lora_alpha=6, target_modules=names,
                            rank_pattern={n: 2 for n in names if n.endswith(("conv2", "fc2"))},
                            alpha_pattern={n: 3 for n in names[::5]})  # fmt: skip
        layers_sd = {}
        for name, (down, up) in layers.items():
            layers_sd[f"{name}.lora_A.weight"], layers_sd[f"{name}.lora_B.weight"] = down, up
        kwargs[f"{component}_lora_layers"] = layers_sd
        kwargs[f"{component}_lora_adapter_metadata"] = config.to_dict()
    StableDiffusionXLPipeline.save_lora_weights(path.parent, weight_name=path.name, **kwargs)
    return path


def _save_old_diffusers(lora, path):
    """diffusers' older keys: UNet attention processors (`attn1.processor.to_q_lora.down.weight`), `.lora.down.weight`
    elsewhere, CLIP `.lora_linear_layer.down.weight` (`text_projection.lora.down.weight`); no metadata: alpha = rank."""
    from safetensors.torch import save_file

    sd = {}
    for component, layers in lora.items():
        for name, (down, up) in layers.items():
            if name == "text_projection":
                key = f"{component}.text_projection.lora"
            elif component != "unet":
                key = f"{component}.text_model.{name.removeprefix('text_model.')}.lora_linear_layer"
            elif m := re.fullmatch(r"(.*\.attn\d)\.(to_q|to_k|to_v|to_out)(\.0)?", name):
                key = f"unet.{m[1]}.processor.{m[2]}_lora"
            else:
                key = f"unet.{name}.lora"
            sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = down, up
    save_file(sd, path)
    return path


def _sgm_name(name: str, layers_per_block: int) -> str:
    """diffusers UNet module -> the SGM UNet's (kohya's SDXL trainer), for the tiny UNets' layout: the inverse of
    diffusers' _maybe_map_sgm_blocks_to_diffusers + _convert_unet_lora_key."""
    n = layers_per_block + 1
    fixed = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2"}  # fmt: skip
    if name in fixed:
        return fixed[name]
    for old, new in {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                     "conv_shortcut": "skip_connection"}.items():  # fmt: skip
        name = re.sub(rf"(resnets\.\d+)\.{old}$", rf"\1.{new}", name)
    name = re.sub(
        r"down_blocks\.(\d+)\.downsamplers\.0\.conv", lambda m: f"input_blocks.{(int(m[1]) + 1) * n}.0.op", name
    )
    name = re.sub(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)",
                  lambda m: f"input_blocks.{int(m[1]) * n + int(m[3]) + 1}.{int(m[2] == 'attentions')}",
                  name)  # fmt: skip
    name = re.sub(
        r"up_blocks\.(\d+)\.upsamplers\.0\.conv", lambda m: f"output_blocks.{int(m[1]) * n + n - 1}.2.conv", name
    )
    name = re.sub(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)",
                  lambda m: f"output_blocks.{int(m[1]) * n + int(m[3])}.{int(m[2] == 'attentions')}", name)  # fmt: skip
    mid = {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}
    return re.sub(r"mid_block\.(resnets\.\d|attentions\.\d)", lambda m: f"middle_block.{mid[m[1]]}", name)


def _save_kohya(lora, path, sgm_layers_per_block: int | None = None):
    """kohya keys: lora_unet_/lora_te1_/lora_te2_ + the module path with '_', .lora_down/.lora_up/.alpha; alpha 6
    for Linear layers, 3 for convolutions (LoCon's conv_alpha), CLIP names with `text_model.` as kohya writes them."""
    from safetensors.torch import save_file

    sd = {}
    for component, layers in lora.items():
        for name, (down, up) in layers.items():
            if component == "unet" and sgm_layers_per_block is not None:
                name = _sgm_name(name, sgm_layers_per_block)
            elif component != "unet" and not name.startswith(("text_model.", "text_projection")):
                name = "text_model." + name
            key = KOHYA_PREFIX[component] + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down.half(), up.half()
            sd[f"{key}.alpha"] = torch.tensor(3.0 if down.ndim == 4 else 6.0)
    save_file(sd, path)
    return path


def _pair(module: str, down, up) -> dict:
    return {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}


def _kohya(module: str, down, up, alpha=4.0) -> dict:
    return {f"{module}.lora_down.weight": down.clone(), f"{module}.lora_up.weight": up.clone(),
            f"{module}.alpha": torch.tensor(alpha)}  # fmt: skip


def _diffusers_fused(kind: str, loras):
    """The diffusers recipe for several LoRAs with their own scales: load each under its adapter name,
    set_adapters(weights=scales), fuse_lora(), unload_lora_weights()."""
    pipe = _fresh_pipe(kind)
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"lora{i}")
    pipe.set_adapters([f"lora{i}" for i in range(len(loras))], adapter_weights=[s for _, s in loras])
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe


def test_fused_weight_formula(tmp_path):
    """W + scale * alpha / rank * up @ down, per layer, with kohya's per-layer alpha (diffusers 0.42 falls back to
    the file's most common alpha for attention projections and CLIP layers whose alpha differs from it)."""
    from safetensors.torch import save_file

    pipe = _fresh_pipe("base")
    g = torch.Generator().manual_seed(0)
    q, conv = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q, pipe.unet.conv_in
    (a1, b1), (a2, b2) = [(torch.randn(r, *m.weight.shape[1:], generator=g),
                           torch.randn(m.weight.shape[0], r, *[1] * (m.weight.ndim - 2), generator=g))
                          for r, m in ((3, q), (2, conv))]  # fmt: skip
    path = tmp_path / "lora.safetensors"
    save_file({**_kohya("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", a1, b1, alpha=5.0),
               **_kohya("lora_unet_conv_in", a2, b2, alpha=1.0)}, path)  # fmt: skip
    expected_q = q.weight + 0.7 * 5.0 / 3 * (b1 @ a1)
    expected_conv = conv.weight + 0.7 * 1.0 / 2 * torch.einsum("or,rikl->oikl", b2[:, :, 0, 0], a2)
    apply_loras("unet", pipe.unet, [(path, 0.7)])
    assert torch.allclose(q.weight, expected_q, atol=1e-6) and torch.allclose(conv.weight, expected_conv, atol=1e-6)


@pytest.fixture(scope="module")
def base_loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    pipe = _fresh_pipe("base")
    lora = _random_lora(pipe, COMPONENTS, seed=1)
    kohya = _random_lora(pipe, COMPONENTS, seed=2)
    old = _random_lora(pipe, COMPONENTS, seed=4)
    return {"peft": _save_peft(lora, d / "peft.safetensors"),
            "kohya": _save_kohya(kohya, d / "kohya_sgm.safetensors", pipe.unet.config.layers_per_block),
            "old": _save_old_diffusers(old, d / "old.safetensors")}  # fmt: skip


@pytest.mark.parametrize(
    "files", [["peft"], ["kohya"], ["old"], ["peft", "kohya"]], ids=["peft", "kohya", "old", "two"]
)
def test_fused_weights_equal_diffusers(base_loras, files):
    """Every weight as diffusers fuses it, for each format and for two LoRAs with their own scales."""
    loras = [(base_loras[f], s) for f, s in zip(files, [0.8, -0.5], strict=False)]
    ref = _diffusers_fused("base", loras)
    ours = _fresh_pipe("base")
    for component in COMPONENTS:
        before = {k: v.clone() for k, v in getattr(ours, component).state_dict().items()}
        fused = apply_loras(component, getattr(ours, component), loras).state_dict()
        expected = getattr(ref, component).state_dict()
        assert fused.keys() == expected.keys()
        changed = 0
        for k, v in expected.items():
            assert torch.allclose(fused[k], v, rtol=0, atol=1e-6), (component, k)
            changed += not torch.equal(v, before[k])
        n_layers = sum(isinstance(m, torch.nn.Linear | torch.nn.Conv2d) for m in getattr(ref, component).modules())
        assert changed == n_layers, (component, changed, n_layers)  # every layer changed, and nothing else


def _parity(kind: str, loras, tmp_path, monkeypatch):
    out = convert_pipeline(str(source_dir(kind)), tmp_path / "out", weight_format="fp32", loras=loras,
                           log=lambda s: None, isolate=False)  # fmt: skip
    ours = parity.run_ours(out, seed=7, **SMALL)
    pipe = _diffusers_fused(kind, loras)
    pipe.original_scheduler = pipe.scheduler
    monkeypatch.setattr(parity, "diffusers_pipe", lambda src, img2img=False: pipe)  # not the shared cached one
    theirs = parity.run_diffusers(source_dir(kind), seed=7, **SMALL)
    parity.assert_parity(ours, theirs)
    return theirs


def test_base_two_loras_parity(base_loras, tmp_path, monkeypatch):
    """Both formats at once, each with its own scale (each alone: test_fused_weights_equal_diffusers)."""
    theirs = _parity("base", [(base_loras["peft"], 0.8), (base_loras["kohya"], 0.5)], tmp_path, monkeypatch)
    pipe = _fresh_pipe("base")
    pipe.original_scheduler = pipe.scheduler
    monkeypatch.setattr(parity, "diffusers_pipe", lambda src, img2img=False: pipe)
    plain = parity.run_diffusers(source_dir("base"), seed=7, **SMALL)
    assert abs(plain[0] - theirs[0]).max() > 0.05  # the LoRAs change the picture


def test_vega_unet_lora_parity(tmp_path, monkeypatch):
    """An LCM-LoRA-like UNet-only LoRA (kohya keys in diffusers spelling) on Vega's block layout."""
    lora = _random_lora(_fresh_pipe("vega"), ["unet"], seed=3)
    # diffusers' kohya loader drops add_embedding layers spelled the diffusers way (it strips their index)
    lora["unet"] = {k: v for k, v in lora["unet"].items() if not k.startswith("add_embedding")}
    path = _save_kohya(lora, tmp_path / "vega_lcm_lora.safetensors")
    _parity("vega", [(path, 1.0)], tmp_path, monkeypatch)


def test_api_errors_and_untouched_components(base_loras, tmp_path):
    from safetensors.torch import save_file

    pipe = _fresh_pipe("base")
    files = {
        # conv_in is a 3x3 conv: a 1x1 LoRA (or a 3x3 up) does not fit it
        "shape": _pair("unet.conv_in", torch.ones(2, 4, 1, 1), torch.ones(16, 2, 1, 1)),
        # SDXL's UNet has a third down block; the tiny one has two
        "block": {**_kohya("lora_unet_down_blocks_1_attentions_0_proj_in", torch.ones(4, 32), torch.ones(32, 4)),
                  **_kohya("lora_unet_down_blocks_2_attentions_0_proj_in", torch.ones(4, 32), torch.ones(32, 4))},
        "sgm": _kohya("lora_unet_input_blocks_7_1_proj_in", torch.ones(4, 32), torch.ones(32, 4)),
        "no-component": _pair("transformer.blocks.0.attn.to_q", torch.ones(4, 32), torch.ones(32, 4)),
        "loha": {"lora_unet_conv_in.hada_w1_a": torch.ones(16, 2)},
        "unpaired": {"unet.conv_in.lora_A.weight": torch.ones(2, 4, 3, 3)},
        "unet-only": _pair("unet.conv_in", torch.ones(2, 4, 3, 3), torch.ones(16, 2, 1, 1)),
    }  # fmt: skip
    path = {name: tmp_path / f"{name}.safetensors" for name in files}
    for name, sd in files.items():
        save_file(sd, path[name])
    (tmp_path / "pickle.safetensors").write_bytes(b"not a safetensors file")
    errors = {
        "shape": "key 'unet.conv_in.lora_A.weight' does not match the UNet (down [2, 4, 1, 1], up [16, 2, 1, 1] "
        "for module conv_in of weight [16, 4, 3, 3])",
        "block": "key 'lora_unet_down_blocks_2_attentions_0_proj_in.lora_down.weight' does not match the UNet "
        "(no Linear or Conv2d module down_blocks_2_attentions_0_proj_in)",
        "sgm": "key 'lora_unet_input_blocks_7_1_proj_in.lora_down.weight' does not match the UNet",
    }
    for name, message in errors.items():
        check_loras([(path[name], 1.0)])  # the files themselves are fine LoRAs
        with pytest.raises(ConvertError) as e:
            apply_loras("unet", pipe.unet, [(path[name], 1.0)])
        assert str(e.value).startswith(f"{path[name]}: {message}"), str(e.value)
    for name, message in {
        "no-component": "key 'transformer.blocks.0.attn.to_q.lora_A.weight' matches no component",
        "loha": "key 'lora_unet_conv_in.hada_w1_a' is not a LoRA down/up weight or alpha",
        "unpaired": "key 'unet.conv_in.lora_A.weight' has no matching up weight",
        "pickle": "pickle.safetensors: not a readable .safetensors file",
    }.items():
        with pytest.raises(ConvertError, match=re.escape(message)):
            check_loras([(tmp_path / f"{name}.safetensors", 1.0)])
    for scale in (float("nan"), float("inf"), "0.5", None):
        with pytest.raises(ConvertError, match="is not a finite number"):
            check_loras([(base_loras["peft"], scale)])
    with pytest.raises(ConvertError, match="'lora_te1_.*' is for text_encoder, which this pipeline does not have"):
        check_loras([(base_loras["kohya"], 1.0)], components=["text_encoder_2", "unet"])
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    te = apply_loras("text_encoder", pipe.text_encoder, [(path["unet-only"], 1.0)])
    assert all(torch.equal(v, before[k]) for k, v in te.state_dict().items())
    assert apply_loras("vae", pipe.vae, [(path["unet-only"], 1.0)]) is pipe.vae


def _cli(*args):
    return cli.run("convert", *args)


def test_cli_bad_loras(tmp_path):
    """One `error:` line naming the problem, exit 2, no traceback, OUT not created."""
    from safetensors.torch import save_file

    # an SDXL LoRA: CLIP ViT-L has 12 layers, the tiny one 3 (its text encoder is converted first, so this fails
    # early); its UNet keys would fail too (test_api_errors_and_untouched_components)
    sdxl = tmp_path / "sdxl_lora.safetensors"
    te1 = _kohya("lora_te1_text_model_encoder_layers_11_self_attn_q_proj", torch.ones(4, 768), torch.ones(768, 4))
    unet = _kohya("lora_unet_down_blocks_2_attentions_0_proj_in", torch.ones(4, 1280), torch.ones(1280, 4))
    save_file({**te1, **unet}, sdxl)
    cases = {
        "layout": (f"{sdxl}:0.7", f"error: {sdxl}: key 'lora_te1_text_model_encoder_layers_11_self_attn_q_proj."
                   "lora_down.weight' does not match text_encoder (no Linear or Conv2d module "
                   "text_model_encoder_layers_11_self_attn_q_proj)"),
        "missing": (str(tmp_path / "nope.safetensors"), f"error: {tmp_path / 'nope.safetensors'}: no such LoRA file"),
        "scale": (f"{sdxl}:abc", f"error: --lora {sdxl}:abc: scale 'abc' is not a number"),
    }  # fmt: skip
    for case, (spec, expected) in cases.items():
        out = tmp_path / f"out-{case}"
        proc = _cli(source_dir("base"), out, "--weight-format", "fp32", "--lora", spec)
        assert proc.returncode == 2, (case, proc.stderr)
        assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [expected], proc.stderr
        assert "Traceback" not in proc.stderr, (case, proc.stderr)
        assert not out.exists() and not list(tmp_path.glob(f".out-{case}*")), case
