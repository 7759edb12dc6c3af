"""Write a diffusers SDXL folder as ONE .safetensors in the original Stability (SGM/LDM) layout that model sites
distribute: the inverse of what diffusers' single-file loader (diffusers/loaders/single_file_utils.py) undoes.

    model.diffusion_model.*                    UNet (input_blocks / middle_block / output_blocks)
    first_stage_model.*                        VAE (encoder.down.N.block.M / decoder.up.N ...)
    conditioner.embedders.0.transformer.*      CLIP-L, in transformers' layout under `text_model.`
    conditioner.embedders.1.model.*            OpenCLIP bigG (resblocks, fused in_proj, text_projection as x @ P)
"""

from __future__ import annotations

import re
from pathlib import Path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
# diffusers' infer_diffusers_model_type calls a file "xl_base" when it holds this key (layer 9 of bigG's 32).
XL_BASE_KEY = OPEN_CLIP_PREFIX + "transformer.resblocks.9.mlp.c_proj.bias"

# diffusers ResnetBlock2D -> LDM ResBlock (UNet only; the VAE's resnets keep their names)
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# diffusers VAE attention -> LDM AttnBlock (1x1 convolutions there, linears here)
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# transformers CLIPEncoderLayer -> OpenCLIP ResidualAttentionBlock (q/k/v are fused, handled apart)
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _split(key: str) -> tuple[str, str]:
    """'a.b.c.weight' -> ('a.b.c', 'weight')"""
    module, _, param = key.rpartition(".")
    return module, param


def _rename(name: str, table: dict[str, str]) -> str:
    if name not in table:
        raise KeyError(name)
    return table[name]


def unet_to_ldm(state: dict, config: dict) -> dict:
    """diffusers UNet2DConditionModel (SDXL-like: attention mid block) -> `input_blocks/middle_block/output_blocks`."""
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise NotImplementedError("LDM numbers the middle block as resnet, attention, resnet")
    per_level = config["layers_per_block"] + 1  # LDM blocks per level: the resnets (+ attentions), then a resampler
    out = {}
    for key, value in state.items():
        module, param = _split(key)
        if module in _UNET_TOP:
            ldm = _UNET_TOP[module]
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
            ldm = f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.0.{_rename(m[3], _UNET_RESNET)}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
            ldm = f"input_blocks.{1 + int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            ldm = f"input_blocks.{1 + int(m[1]) * per_level + per_level - 1}.0.op"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(\w+)", module):
            ldm = f"middle_block.{2 * int(m[1])}.{_rename(m[2], _UNET_RESNET)}"
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
            ldm = f"middle_block.1.{m[1]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
            ldm = f"output_blocks.{int(m[1]) * per_level + int(m[2])}.0.{_rename(m[3], _UNET_RESNET)}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
            ldm = f"output_blocks.{int(m[1]) * per_level + int(m[2])}.1.{m[3]}"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            level = int(m[1])
            # after the level's last resnet (.0) and, in a cross-attention level, its attention (.1)
            slot = 2 if any(k.startswith(f"up_blocks.{level}.attentions.") for k in state) else 1
            ldm = f"output_blocks.{level * per_level + per_level - 1}.{slot}.conv"
        else:
            raise KeyError(f"unet: no LDM name for {key}")
        out[f"{UNET_PREFIX}{ldm}.{param}"] = value
    return out


def vae_to_ldm(state: dict, config: dict) -> dict:
    """diffusers AutoencoderKL -> LDM `encoder.down.N.block.M`, `decoder.up.N` (numbered bottom-up)."""
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        module, param = _split(key)
        value_out = value
        if module in ("quant_conv", "post_quant_conv", "encoder.conv_in", "encoder.conv_out", "decoder.conv_in",
                      "decoder.conv_out"):  # fmt: skip
            ldm = module
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out", module):
            ldm = f"{m[1]}.norm_out"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
            ldm = f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            ldm = f"encoder.down.{m[1]}.downsample.conv"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
            ldm = f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            ldm = f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)", module):
            ldm = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", module):
            ldm = f"{m[1]}.mid.attn_1.{_rename(m[2], _VAE_ATTN)}"
            if param == "weight" and m[2] != "group_norm":
                value_out = value[:, :, None, None]  # the original AttnBlock's q/k/v/proj_out are 1x1 convolutions
        else:
            raise KeyError(f"vae: no LDM name for {key}")
        out[f"{VAE_PREFIX}{ldm}.{param}"] = value_out
    return out


def clip_to_ldm(state: dict) -> dict:
    """transformers CLIPTextModel -> `conditioner.embedders.0.transformer.text_model.*` (same names)."""
    return {CLIP_PREFIX + "text_model." + k.removeprefix("text_model."): v for k, v in state.items()}


def open_clip_to_ldm(state: dict) -> dict:
    """transformers CLIPTextModelWithProjection -> OpenCLIP's text tower under `conditioner.embedders.1.model.`"""
    import torch

    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (layer, weight|bias) -> {q|k|v: tensor}
    for key, value in state.items():
        module, param = _split(key)
        if key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value  # a bare [77, hidden] parameter in OpenCLIP
        elif key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif module == "final_layer_norm":
            out[f"ln_final.{param}"] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()  # OpenCLIP: pooled @ P, P [hidden, projection_dim]
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj", module):
            fused.setdefault((m[1], param), {})[m[2]] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", module):
            out[f"transformer.resblocks.{m[1]}.{_rename(m[2], _OPEN_CLIP_LAYER)}.{param}"] = value
        else:
            raise KeyError(f"text_encoder_2: no OpenCLIP name for {key}")
    for (layer, param), qkv in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def checkpoint_from_folder(diffusers_dir: Path, xl_base_marker: bool = True) -> dict:
    """The single-file state dict of an SDXL base diffusers folder (fp32 tensors, as stored).

    xl_base_marker: diffusers recognises an SDXL base file by XL_BASE_KEY, which a bigG text encoder of fewer than
    10 layers (the tiny test models) does not have; add it (zeros, ignored by the loader) so that the file is
    detected as "xl_base" like a real one."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    diffusers_dir = Path(diffusers_dir)
    unet = UNet2DConditionModel.from_pretrained(diffusers_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(diffusers_dir, subfolder="vae")
    te = CLIPTextModel.from_pretrained(diffusers_dir, subfolder="text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(diffusers_dir, subfolder="text_encoder_2")
    ckpt = {}
    ckpt.update(unet_to_ldm(unet.state_dict(), dict(unet.config)))
    ckpt.update(vae_to_ldm(vae.state_dict(), dict(vae.config)))
    ckpt.update(clip_to_ldm(te.state_dict()))
    ckpt.update(open_clip_to_ldm(te2.state_dict()))
    if xl_base_marker and XL_BASE_KEY not in ckpt:
        ckpt[XL_BASE_KEY] = torch.zeros(te2.config.hidden_size)
    return {k: v.detach().contiguous() for k, v in ckpt.items()}


def write_single_file(diffusers_dir: Path, out_file: Path, xl_base_marker: bool = True) -> Path:
    """Save the SDXL base pipeline in `diffusers_dir` as one SGM-layout .safetensors file at `out_file`."""
    from safetensors.torch import save_file

    out_file = Path(out_file)
    save_file(checkpoint_from_folder(diffusers_dir, xl_base_marker), str(out_file), metadata={"format": "pt"})
    return out_file
