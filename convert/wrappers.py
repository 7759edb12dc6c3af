"""nn.Module shims whose traced inputs and outputs are exactly what the runtime calls.

Input/output names follow what `optimum-cli export openvino` writes for SDXL, so either runtime loads
either folder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Spec:
    """What to trace: the wrapper, example inputs (in forward order) and the IR names and dynamic dims."""

    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    dynamic: dict[str, list[int]]  # input name -> partial shape with -1 for dynamic dims
    outputs: list[str]


class TextEncoder(torch.nn.Module):
    """A CLIP text model -> `heads` (optimum's order), then hidden_states.0..N (clip_skip needs them all).
    CLIPTextModel: last_hidden_state, pooler_output; CLIPTextModelWithProjection: text_embeds, last_hidden_state."""

    def __init__(self, model, heads: tuple[str, str]):
        super().__init__()
        self.model, self.heads = model, heads

    def forward(self, input_ids):
        out = self.model(input_ids, output_hidden_states=True, return_dict=True)
        return (*(getattr(out, h) for h in self.heads), *out.hidden_states)


class UNet(torch.nn.Module):
    """UNet2DConditionModel with SDXL's text_time added conditioning as flat inputs."""

    def __init__(self, model, with_timestep_cond: bool):
        super().__init__()
        self.model, self.with_timestep_cond = model, with_timestep_cond

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids, timestep_cond=None):
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        kwargs = {"timestep_cond": timestep_cond} if self.with_timestep_cond else {}
        return self.model(
            sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False, **kwargs
        )[0]


class VaeEncoder(torch.nn.Module):
    """AutoencoderKL.encode -> the posterior's parameters (mean, logvar) [B, 2C, h, w]; sampled in the runtime."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=True).latent_dist.parameters


class VaeDecoder(torch.nn.Module):
    """AutoencoderKL.decode of latents already divided by scaling_factor -> image in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class TinyVaeEncoder(torch.nn.Module):
    """AutoencoderTiny.encode -> latents [B, C, h, w] (no posterior: TAESD encodes deterministically); the runtime
    multiplies by scaling_factor as diffusers' img2img pipeline does."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0]


class TinyVaeDecoder(torch.nn.Module):
    """AutoencoderTiny.decode of latents already divided by scaling_factor -> image in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


def _text_spec(model, heads: tuple[str, str], ids: torch.Tensor) -> Spec:
    outputs = [*heads] + [f"hidden_states.{i}" for i in range(model.config.num_hidden_layers + 1)]
    return Spec(TextEncoder(model, heads), {"input_ids": ids}, {"input_ids": [-1, 77]}, outputs)


def _example_ids(model, batch: int, eos_at: int, pad: int) -> torch.Tensor:
    ids = torch.randint(1, model.config.vocab_size - 2, (batch, 77), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, eos_at], ids[:, eos_at + 1 :] = 49406, 49407, pad  # bos, text, eos, padding
    return ids


def text_encoder_spec(model, batch: int = 2) -> Spec:
    """CLIPTextModel; tokenizer pads with eos (49407)."""
    return _text_spec(model, ("last_hidden_state", "pooler_output"), _example_ids(model, batch, 20, 49407))


def text_encoder_2_spec(model, batch: int = 2) -> Spec:
    """CLIPTextModelWithProjection; tokenizer_2 pads with "!" (id 0) after the eos."""
    return _text_spec(model, ("text_embeds", "last_hidden_state"), _example_ids(model, batch, 19, 0))


def unet_spec(model, pooled_dim: int, height: int = 72, width: int = 56, batch: int = 2,
              timestep_dtype: str = "f32") -> Spec:  # fmt: skip
    """pooled_dim: text_encoder_2's projection_dim. The rest of the added conditioning is time ids:
    6 * 256 + 1280 = 2816 (base), 5 * 256 + 1280 = 2560 (refiner, aesthetic score).
    The example latent (9 x 7) is not a multiple of 2**upsamplers on purpose: diffusers then passes each skip
    connection's size to the upsamplers, and that path, traced, serves every latent size (even ones alike)."""
    cfg = model.config
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    lat_c = cfg.in_channels
    n_ids, rest = divmod(cfg.projection_class_embeddings_input_dim - pooled_dim, cfg.addition_time_embed_dim)
    if rest or n_ids not in (5, 6):
        raise ValueError(f"unet projection_class_embeddings_input_dim does not fit text_encoder_2 ({pooled_dim})")
    inputs = {
        "sample": torch.randn(batch, lat_c, height // 8, width // 8, generator=gen).to(dtype),
        # [1] float32: fractional timesteps (Karras sigmas) stay exact; i64 is what optimum exports and
        # openvino.genai feeds
        "timestep": torch.tensor([537.25]) if timestep_dtype == "f32" else torch.tensor([537], dtype=torch.int64),
        "encoder_hidden_states": torch.randn(batch, 77, cfg.cross_attention_dim, generator=gen).to(dtype),
        "text_embeds": torch.randn(batch, pooled_dim, generator=gen).to(dtype),
        "time_ids": torch.tensor([[height, width, 0, 0, height, width, 6.0][:n_ids]] * batch).to(dtype),
    }
    dynamic = {
        "sample": [-1, lat_c, -1, -1],
        "timestep": [1],
        "encoder_hidden_states": [-1, -1, cfg.cross_attention_dim],
        "text_embeds": [-1, pooled_dim],
        "time_ids": [-1, n_ids],
    }
    if cfg.time_cond_proj_dim:
        inputs["timestep_cond"] = torch.randn(batch, cfg.time_cond_proj_dim, generator=gen).to(dtype)
        dynamic["timestep_cond"] = [-1, cfg.time_cond_proj_dim]
    return Spec(UNet(model, bool(cfg.time_cond_proj_dim)), inputs, dynamic, ["out_sample"])


def vae_encoder_spec(vae, height: int = 64, width: int = 48) -> Spec:
    dtype = next(vae.parameters()).dtype
    x = torch.rand(1, vae.config.in_channels, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return Spec(VaeEncoder(vae), {"sample": x.to(dtype)}, {"sample": [-1, vae.config.in_channels, -1, -1]},
                ["latent_parameters"])  # fmt: skip


def vae_decoder_spec(vae, height: int = 64, width: int = 48) -> Spec:
    dtype = next(vae.parameters()).dtype
    c = vae.config.latent_channels
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    z = torch.randn(1, c, height // f, width // f, generator=torch.Generator().manual_seed(0))
    return Spec(VaeDecoder(vae), {"latent_sample": z.to(dtype)}, {"latent_sample": [-1, c, -1, -1]}, ["sample"])


def tiny_vae_encoder_spec(vae, height: int = 64, width: int = 48) -> Spec:
    dtype = next(vae.parameters()).dtype
    x = torch.rand(1, vae.config.in_channels, height, width, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return Spec(TinyVaeEncoder(vae), {"sample": x.to(dtype)}, {"sample": [-1, vae.config.in_channels, -1, -1]},
                ["latents"])  # fmt: skip


def tiny_vae_decoder_spec(vae, height: int = 64, width: int = 48) -> Spec:
    """Example latents of SDXL's spread (std ~1 after the 0.13025 scaling, some beyond TAESD's tanh clamp at 3)."""
    dtype = next(vae.parameters()).dtype
    c = vae.config.latent_channels
    f = vae.config.upsampling_scaling_factor ** (len(vae.config.decoder_block_out_channels) - 1)
    z = torch.randn(1, c, height // f, width // f, generator=torch.Generator().manual_seed(0)) * 2
    return Spec(TinyVaeDecoder(vae), {"latent_sample": z.to(dtype)}, {"latent_sample": [-1, c, -1, -1]}, ["sample"])
