"""Tokenize and encode prompts into SDXL's prompt embeddings and pooled embeddings.

# ref: diffusers StableDiffusionXLPipeline.encode_prompt (v0.42)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from runtime.ov_model import OVModel
from runtime.tokenizer import Tokenizer


@dataclass
class PromptEmbeds:
    embeds: np.ndarray  # [B*n, 77, D]   D = 768 + 1280 = 2048 (base), 1280 (refiner)
    pooled: np.ndarray  # [B*n, P]       P = 1280
    negative_embeds: np.ndarray | None  # None without guidance
    negative_pooled: np.ndarray | None


def _as_list(x: str | list[str] | None, n: int, what: str) -> list[str] | None:
    if x is None:
        return None
    if isinstance(x, str):
        return [x] * n
    if len(x) != n:
        raise ValueError(f"{what} has {len(x)} entries but prompt has {n}")
    return list(x)


class TextEncoder:
    """One tokenizer + text encoder pair; exposes hidden states (clip_skip) and the pooled output."""

    def __init__(self, tokenizer: Tokenizer, encoder: OVModel):
        self.tokenizer, self.encoder = tokenizer, encoder
        self.n_hidden = sum(1 for n in encoder.output_names if n.startswith("hidden_states."))  # layers + 1
        # The pooled output diffusers uses is the projected one of CLIPTextModelWithProjection.
        self.has_pooled = "text_embeds" in encoder.output_names

    def __call__(
        self, texts: list[str], skips: list[int], dropped: list | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Encode texts; row i takes hidden_states[-(skips[i] + 2)] (SDXL indexes from the penultimate layer).
        dropped: gets (row, the text cut off at 77 tokens) per truncated text (Tokenizer.truncated)."""
        ids = self.tokenizer(texts)  # [N, 77] int64
        if dropped is not None:
            dropped += self.tokenizer.truncated(texts, ids)
        out = self.encoder({"input_ids": ids})
        rows = []
        for i, skip in enumerate(skips):
            layer = self.n_hidden - 2 - skip
            if layer < 0:
                raise ValueError(f"clip_skip={skip} is more than the text encoder's {self.n_hidden - 2} layers")
            rows.append(out[f"hidden_states.{layer}"][i])
        return np.stack(rows), (out["text_embeds"] if self.has_pooled else None)


def warn_truncated(text: str, max_length: int = 77) -> None:
    """diffusers' warning for a prompt cut at the tokenizer's limit, through `warnings` (shown once per text)."""
    warnings.warn(
        f"The following part of your input was truncated because CLIP can only handle sequences up to "
        f"{max_length} tokens: {[text]}",
        UserWarning,
        stacklevel=4,
    )


def encode_prompt(
    encoders: list[TextEncoder],
    prompt: str | list[str],
    prompt_2: str | list[str] | None,
    negative_prompt: str | list[str] | None,
    negative_prompt_2: str | list[str] | None,
    num_images_per_prompt: int,
    do_cfg: bool,
    force_zeros_for_empty_prompt: bool,
    clip_skip: int | None,
    prompt_syntax: str = "plain",
) -> PromptEmbeds:
    """encoders: [text_encoder, text_encoder_2] (base) or [text_encoder_2] (refiner). With one encoder,
    diffusers feeds it `prompt` (its zip stops at the first pair), so we do too. prompt_syntax "compel" or
    "a1111": weights and long prompts as compel's CompelForSDXL (runtime.weighting)."""
    if prompt_syntax != "plain":
        from runtime.weighting import embeds_for

        return embeds_for(encoders, prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt,
                          do_cfg, force_zeros_for_empty_prompt, clip_skip, prompt_syntax)  # fmt: skip
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    batch = len(prompts)
    prompts_2 = _as_list(prompt_2, batch, "prompt_2") or prompts
    zero_negative = negative_prompt is None and force_zeros_for_empty_prompt
    encode_negative = do_cfg and not zero_negative
    if encode_negative:
        negative_prompt = negative_prompt or ""
        negative_prompt_2 = negative_prompt_2 or negative_prompt
        negatives = _as_list(negative_prompt, batch, "negative_prompt")
        negatives_2 = _as_list(negative_prompt_2, batch, "negative_prompt_2")

    hidden, neg_hidden, pooled, neg_pooled = [], [], None, None
    warned: set[str] = set()
    for k, (enc, texts) in enumerate(zip(encoders, (prompts, prompts_2), strict=False)):
        skip = 0 if clip_skip is None else clip_skip
        all_texts, skips = list(texts), [skip] * batch
        if encode_negative:  # one batched call; negatives always use the penultimate layer in diffusers
            all_texts += negatives if k == 0 else negatives_2
            skips += [0] * batch
        dropped: list[tuple[int, str]] = []
        states, pooled_out = enc(all_texts, skips, dropped)
        for row, text in dropped:
            if all_texts[row] not in warned:  # once per prompt (both tokenizers cut a prompt they share)
                warned.add(all_texts[row])
                warn_truncated(text, enc.tokenizer.max_length)
        hidden.append(states[:batch])
        if encode_negative:
            neg_hidden.append(states[batch:])
        if pooled is None and pooled_out is not None:
            pooled = pooled_out[:batch]
            if encode_negative:
                neg_pooled = pooled_out[batch:]
    if pooled is None:
        raise ValueError("no text encoder has a pooled projection output (text_embeds)")
    embeds = np.concatenate(hidden, axis=-1)  # [B, 77, 2048]
    if do_cfg and zero_negative:
        neg_embeds, neg_pooled = np.zeros_like(embeds), np.zeros_like(pooled)
    elif do_cfg:
        neg_embeds = np.concatenate(neg_hidden, axis=-1)
    else:
        neg_embeds = None

    def repeat(x):  # each prompt's rows next to each other: [p0, p0, p1, p1] for n = 2
        return None if x is None else np.repeat(x, num_images_per_prompt, axis=0)

    return PromptEmbeds(repeat(embeds), repeat(pooled), repeat(neg_embeds), repeat(neg_pooled))
