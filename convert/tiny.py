"""Tiny random-weight SDXL-architecture pipelines, built in code and deterministic under a seed.

They are the test models of the project and the embedded default of the README: the real SDXL data flow
(two CLIP text encoders, text_time added conditioning, an 8x VAE) at a size that converts in seconds.
Their pictures are noise: the weights are random, not trained.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from convert.clip_vocab import write_clip_tokenizer

# Tiny stand-ins for CLIP-L (768) and OpenCLIP-bigG (1280): hidden 32 and 64.
# Real SDXL keeps the legacy eos_token_id=2 config, so the pooled output is taken at argmax(input_ids).
TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)  # fmt: skip
TEXT_ENCODER_2 = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=32,
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)  # fmt: skip

# 4 levels like SDXL's VAE, so the latent is 1/8 of the image.
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=[8, 8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, sample_size=128, scaling_factor=0.13025, force_upcast=True,
)  # fmt: skip

_UNET_COMMON = dict(
    in_channels=4, out_channels=4, sample_size=16, layers_per_block=2, norm_num_groups=8,
    block_out_channels=[16, 32], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[2, 4],
    use_linear_projection=True, addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=8,
)  # fmt: skip

UNETS = {
    # 32 + 64 = 96 = cross_attention_dim; 6 time ids * 8 + 32 (pooled) = 80
    "base": dict(_UNET_COMMON, transformer_layers_per_block=[1, 2], cross_attention_dim=96,
                 projection_class_embeddings_input_dim=80),
    # refiner: text_encoder_2 only (64); 5 time ids * 8 + 32 = 72
    "refiner": dict(_UNET_COMMON, transformer_layers_per_block=[1, 2], cross_attention_dim=64,
                    projection_class_embeddings_input_dim=72),
    # SSD-1B: fewer transformer layers going down, per-block depths going up, no mid-block attention
    "ssd-1b": dict(_UNET_COMMON, transformer_layers_per_block=[1, 2], cross_attention_dim=96,
                   projection_class_embeddings_input_dim=80, mid_block_type="UNetMidBlock2D",
                   reverse_transformer_layers_per_block=[[3, 1, 1], [1, 1, 1]]),
    # Vega: one transformer layer per block, no mid-block attention, fewer resnets going up
    "vega": dict(_UNET_COMMON, transformer_layers_per_block=[1, 1], cross_attention_dim=96,
                 projection_class_embeddings_input_dim=80, mid_block_type="UNetMidBlock2D"),
    # LCM-distilled SSD-1B: the guidance scale enters as a w-embedding (timestep_cond)
    "lcm": dict(_UNET_COMMON, transformer_layers_per_block=[1, 2], cross_attention_dim=96,
                projection_class_embeddings_input_dim=80, mid_block_type="UNetMidBlock2D",
                reverse_transformer_layers_per_block=[[3, 1, 1], [1, 1, 1]], time_cond_proj_dim=16),
    # mid-size (benchmarks): SDXL's layout at a fifth of its widths and a fifth of its attention depth, with wider
    # text encoders and VAE; a guided UNet call takes about 0.2 s at 512x512 in bf16 on 2 cores (SDXL: about 4 s)
    "mid": dict(in_channels=4, out_channels=4, sample_size=64, layers_per_block=2, norm_num_groups=32,
                block_out_channels=[64, 128, 256],
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                attention_head_dim=[1, 2, 4], transformer_layers_per_block=[1, 1, 2], use_linear_projection=True,
                addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                cross_attention_dim=768, projection_class_embeddings_input_dim=6 * 256 + 512),
}  # fmt: skip
KINDS = tuple(UNETS)
# the mid-size model's text encoders (256 + 512 = its cross_attention_dim) and VAE
MID = {
    "text_encoder": dict(TEXT_ENCODER, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         projection_dim=256),
    "text_encoder_2": dict(TEXT_ENCODER_2, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                           num_attention_heads=8, projection_dim=512),
    "vae": dict(VAE, block_out_channels=[16, 32, 64, 64], norm_num_groups=16, layers_per_block=1, sample_size=512),
}  # fmt: skip

# A tiny stand-in for TAESDXL (diffusers AutoencoderTiny; madebyollin/taesdxl is the default config: 64 channels
# in every block, blocks (1, 3, 3, 3) / (3, 3, 3, 1)): 16 channels, fewer blocks, an 8x VAE on 4 latent channels.
TINY_AUTOENCODER = dict(
    encoder_block_out_channels=[16] * 4, decoder_block_out_channels=[16] * 4, num_encoder_blocks=[1, 2, 2, 2],
    num_decoder_blocks=[2, 2, 2, 1], latent_channels=4,
)  # fmt: skip

# SDXL's scheduler config as released (EulerDiscreteScheduler, leading spacing, steps_offset 1).
EULER = dict(
    _class_name="EulerDiscreteScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", prediction_type="epsilon", interpolation_type="linear",
    timestep_spacing="leading", steps_offset=1, use_karras_sigmas=False, trained_betas=None,
    clip_sample=False, sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True,
)  # fmt: skip
LCM = dict(
    _class_name="LCMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    original_inference_steps=50, timestep_scaling=10.0, clip_sample=False, set_alpha_to_one=True,
    trained_betas=None, rescale_betas_zero_snr=False, thresholding=False,
)  # fmt: skip


def build_tiny_pipeline(kind: str, out_dir: Path, seed: int = 0, unet_overrides: dict | None = None):
    """Build the `kind` tiny pipeline with weights drawn from `seed`; save it as a diffusers folder."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        LCMScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from convert.component import quiet_libraries

    quiet_libraries()
    if kind not in UNETS:
        raise ValueError(f"unknown tiny model kind {kind!r}; known: {', '.join(KINDS)}")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**dict(UNETS[kind], **(unet_overrides or {})))
        torch.manual_seed(seed + 1)
        sizes = MID if kind == "mid" else {"text_encoder": TEXT_ENCODER, "text_encoder_2": TEXT_ENCODER_2, "vae": VAE}
        vae = AutoencoderKL(**sizes["vae"])
        torch.manual_seed(seed + 2)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**sizes["text_encoder_2"]))
        tok_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp / "_tok2", pad_token="!"))
        scheduler_cls, scheduler_cfg = (LCMScheduler, LCM) if kind == "lcm" else (EulerDiscreteScheduler, EULER)
        scheduler = scheduler_cls.from_config(scheduler_cfg)
        if kind == "refiner":
            pipe = StableDiffusionXLImg2ImgPipeline(
                vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tok_2,
                unet=unet, scheduler=scheduler, requires_aesthetics_score=True,
                force_zeros_for_empty_prompt=False, add_watermarker=False,
            )  # fmt: skip
        else:
            torch.manual_seed(seed + 3)
            text_encoder = CLIPTextModel(CLIPTextConfig(**sizes["text_encoder"]))
            tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp / "_tok", pad_token="<|endoftext|>"))
            pipe = StableDiffusionXLPipeline(
                vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok,
                tokenizer_2=tok_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
                add_watermarker=False,
            )  # fmt: skip
        pipe.save_pretrained(tmp, safe_serialization=True)
        # keep the tokenizer files as SDXL ships them (vocab.json, merges.txt), not as re-saved
        for name, written in (("tokenizer", "_tok"), ("tokenizer_2", "_tok2")):
            if (tmp / written).is_dir():
                shutil.rmtree(tmp / name)
                (tmp / written).rename(tmp / name)
        index = json.loads((tmp / "model_index.json").read_text())
        index["_tiny_random_weights"] = f"sdxl-openvino tiny {kind} model, seed {seed}: random weights, not trained"
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def build_tiny_autoencoder(out_dir: Path, seed: int = 0, config: dict | None = None) -> Path:
    """A random-weight diffusers AutoencoderTiny (TINY_AUTOENCODER, or `config`) saved as a diffusers folder: what
    `python -m convert ... --tiny-vae` reads (the tests' and benchmarks' TAESDXL, no weights downloaded)."""
    import torch
    from diffusers import AutoencoderTiny

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        torch.manual_seed(seed)
        AutoencoderTiny(**(TINY_AUTOENCODER if config is None else config)).save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
