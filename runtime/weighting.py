"""Weighted, long prompts -> SDXL prompt embeddings, as compel 2.5.1's CompelForSDXL computes them, in numpy.

ref: compel 2.5.1 embeddings_provider.EmbeddingsProvider (get_embeddings_for_weighted_prompt_fragments,
build_weighted_embedding_tensor, _chunk_and_pad_token_ids, _find_next_best_split_point,
_get_token_ranges_for_fragments, get_pooled_embeddings), compel.Compel (build_conditioning_tensor_for_conjunction,
_get_conditioning_for_blend, pad_conditioning_tensors_to_same_length) and convenience_wrappers.CompelForSDXL:
each text encoder runs as an EmbeddingsProvider with truncate_long_prompts=False,
PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED, split_long_text_mode=SENTENCES, downweight_mode=MASK; the pooled
embedding is text_encoder_2's on the raw prompt text cut at 77 tokens (requires_pooled).

A fragment weighted below 1 is blended with the prompt encoded with that fragment masked out of attention.
The converted text encoders take no attention mask, so a masked variant is derived from the IR (each causal
ScaledDotProductAttention given an additive mask input) and compiled on first use, once per encoder.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from runtime.errors import RuntimeInputError
from runtime.prompts import Blend, Parsed, parse
from runtime.text import PromptEmbeds, TextEncoder

CHUNK = 77  # CLIP's context: BOS + 75 tokens + EOS
BIAS = "attention_bias"
_PHRASE_ENDS = (".</w>", ",</w>", ";</w>", ":</w>")
_providers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # TextEncoder -> _Provider


def _masked_model(model: ov.Model) -> dict[str, ov.Model]:
    """The text encoder with an additive attention mask [B, 1, 77, 77] (causal and key masking) as an input:
    each ScaledDotProductAttention gets it (added to its own mask where it has one and is not causal)."""
    ids = model.input("input_ids").get_partial_shape()
    bias = ops.parameter([ids[0].get_length(), 1, CHUNK, CHUNK], ov.Type.f32, name=BIAS)
    bias.output(0).set_names({BIAS})
    found = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "ScaledDotProductAttention":
            continue
        q, k, v = (op.input_value(i) for i in range(3))
        mask = bias.output(0)
        if not op.get_attributes().get("causal") and op.get_input_size() > 3:  # its own (causal) mask: add ours
            own = op.input_value(3)
            if own.get_element_type() == ov.Type.boolean:
                own = ops.select(own, np.float32(0), np.finfo(np.float32).min).output(0)
            mask = ops.add(ops.convert(own, ov.Type.f32), bias).output(0)
        scale = [op.input_value(4)] if op.get_input_size() > 4 else []
        new = ops.scaled_dot_product_attention(q, k, v, mask, *scale, causal=False)
        op.output(0).replace(new.output(0))
        found += 1
    if not found:
        raise RuntimeInputError("text encoder IR: no attention found to mask (needed for weights below 1)")
    model.add_parameters([bias])
    model.validate_nodes_and_infer_types()
    return {"masked": model}


class _Provider:
    """compel's EmbeddingsProvider for one tokenizer + text encoder (numpy, batch-1 calls as compel makes)."""

    def __init__(self, enc: TextEncoder):
        self.enc, self.tok = enc, enc.tokenizer
        empty = self.tok([""])[0]  # [BOS, EOS, pad...] (ours pads to 77; optimum's may not)
        self.bos, self.eos = int(empty[0]), int(empty[1])
        pad = int(empty[2]) if len(empty) > 2 and self.tok.pad_token_id is None else self.tok.pad_token_id
        self.pad = self.eos if pad is None else int(pad)
        self.layer = f"hidden_states.{enc.n_hidden - 2}"  # hidden_states[-2]
        self._empty_z: np.ndarray | None = None

    def encode(self, ids: list[int], mask: np.ndarray | None = None) -> np.ndarray:
        """[77, D] penultimate hidden states; `mask` with zeros: those keys are masked out of attention."""
        ids_arr = np.asarray([ids], np.int64)
        if mask is None or mask.all():
            return self.enc.encoder({"input_ids": ids_arr})[self.layer][0]
        model = self.enc.encoder
        allowed = np.tril(np.ones((CHUNK, CHUNK), bool)) & (mask[None, :] != 0)  # query i sees keys j <= i
        bias = np.where(allowed, 0.0, np.finfo(np.float32).min).astype(np.float32)[None, None]
        with model.in_use():
            compiled = model.compile_derived({"input_ids": ids_arr.shape}, "attention-mask", _masked_model)
            request = compiled["masked"].create_infer_request()
            request.infer({"input_ids": ids_arr, BIAS: bias})
            return request.get_tensor(self.layer).data[0].copy()

    @property
    def empty_z(self) -> np.ndarray:
        if self._empty_z is None:
            self._empty_z = self.encode([self.bos, self.eos] + [self.pad] * (CHUNK - 2))
        return self._empty_z

    def pooled(self, texts: list[str]) -> np.ndarray:
        """ref: EmbeddingsProvider.get_pooled_embeddings: the raw text, truncated at 77 tokens."""
        ids = self.tok(texts)
        return np.concatenate([self.enc.encoder({"input_ids": row[None]})["text_embeds"] for row in ids])

    def _split_point(self, ids: list[int], max_length: int) -> int:
        """ref: EmbeddingsProvider._find_next_best_split_point, SENTENCES falling back to PHRASES, WORDS."""
        if len(ids) <= max_length:
            return max_length
        vocab = self.tok.id_to_token()
        if not vocab:
            raise RuntimeInputError(f"{self.tok._vocab_path}: missing; long prompts are split with it")
        text = [vocab.get(i, "") for i in ids[:max_length]]
        for test in (lambda t: t == ".</w>", lambda t: t in _PHRASE_ENDS, lambda t: t.endswith("</w>")):
            for index in range(len(text) - 1, -1, -1):
                if test(text[index]):
                    return index + 1
        return max_length

    def _chunks(self, ids: list[int], weights: list[float]) -> tuple[list[int], list[float], list[int]]:
        """ref: EmbeddingsProvider._chunk_and_pad_token_ids (truncate=False, padding mask value 1)."""
        all_ids: list[int] = []
        all_w: list[float] = []
        while True:
            split = self._split_point(ids, CHUNK - 2)
            chunk, chunk_w, ids, weights = ids[:split], weights[:split], ids[split:], weights[split:]
            pad = CHUNK - len(chunk) - 2
            all_ids += [self.bos, *chunk, self.eos] + [self.pad] * pad
            all_w += [1.0, *chunk_w, 1.0] + [1.0] * pad
            if not ids:
                return all_ids, all_w, [1] * len(all_ids)

    def _ranges(self, tokens: list[int], per_fragment: list[list[int]]) -> list[tuple[int, int] | None]:
        """ref: EmbeddingsProvider._get_token_ranges_for_fragments (truncate=False)."""
        start, out = 0, []
        boundary = (self.eos, self.pad, self.bos)
        for k, frag in enumerate(per_fragment):
            if not frag:
                out.append(None)
                continue
            while True:
                if start >= len(tokens) - 1:
                    raise RuntimeInputError(f"cannot find fragment {k} of the prompt in its tokens (compel fails too)")
                if tokens[start] == frag[0]:
                    break
                start += 1
            end, rel = start, 0
            while True:
                if end >= len(tokens) - 1:
                    raise RuntimeInputError(f"cannot find fragment {k} of the prompt in its tokens (compel fails too)")
                if tokens[end] == frag[rel]:
                    rel += 1
                    if rel == len(frag):
                        break
                    end += 1
                elif tokens[end] in boundary:
                    end += 1
                else:
                    raise RuntimeInputError(f"fragment {k} of the prompt tokenizes differently in context")
            out.append((start, end))
            start = end + 1
        return out

    def _weighted(self, tokens: list[int], weights: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """ref: EmbeddingsProvider.build_weighted_embedding_tensor: per chunk, empty_z + (z - empty_z) * w."""
        out = []
        for c in range(0, len(tokens), CHUNK):
            z = self.encode(tokens[c : c + CHUNK], mask[c : c + CHUNK])
            w = weights[c : c + CHUNK, None]
            if not (w == 1).all():
                e = self.empty_z
                z = np.where(w == 1, z, e + (z - e) * w)
            out.append(z)
        return np.concatenate(out)

    def fragments(self, segments: list[list[tuple[str, float]]]) -> np.ndarray:
        """[n*77, D] for one flattened prompt. ref: get_embeddings_for_weighted_prompt_fragments (MASK mode);
        segments after the first (A1111's BREAK) start a new chunk."""
        texts = [t for seg in segments for t, _ in seg]
        frag_w = [w for seg in segments for _, w in seg]
        if not texts:
            texts, frag_w, segments = [""], [1.0], [[("", 1.0)]]
        per_fragment = [ids[1:-1] if ids[-1:] == [self.eos] else ids[1:] for ids in self.tok.token_ids(texts)]
        tokens: list[int] = []
        tw: list[float] = []
        k = 0
        for seg in segments or [[]]:
            ids, ws = [], []
            for _ in seg:
                ids += per_fragment[k]
                ws += [float(frag_w[k])] * len(per_fragment[k])
                k += 1
            t, w, _ = self._chunks(ids, ws)
            tokens += t
            tw += w
        weights = np.asarray(tw, np.float32)
        mask = np.ones(len(tokens), np.int64)
        embeddings = [self._weighted(tokens, weights, mask)]
        lerp = [1.0]
        for index, rng in enumerate(self._ranges(tokens, per_fragment)):
            w = frag_w[index]
            if w < 1 and rng is not None:
                without = mask.copy()
                without[rng[0] : rng[1] + 1] = 0
                without[0::CHUNK] = 1  # compel keeps the chunks' BOS and last position
                without[CHUNK - 1 :: CHUNK] = 1
                embeddings.append(self._weighted(tokens, weights, without))
                lerp.append(math.tan((1.0 - max(1e-5, w)) * math.pi / 2))
        return _blend(embeddings, lerp, normalize=True)

    def pad_to(self, z: np.ndarray, length: int) -> np.ndarray:
        """ref: Compel._pad_conditioning_tensors_to_same_length: empty_z chunks appended."""
        n = (length - len(z)) // CHUNK
        return np.concatenate([z] + [self.empty_z] * n) if n > 0 else z

    def conditioning(self, parsed: Parsed) -> np.ndarray:
        """ref: Compel.build_conditioning_tensor_for_conjunction: the parts concatenated along the tokens."""
        parts = []
        for part, weight in zip(parsed.parts, parsed.weights, strict=True):
            if isinstance(part, Blend):
                zs = [self.fragments(p) for p in part.prompts]
                length = max(len(z) for z in zs)
                z = _blend([self.pad_to(z, length) for z in zs], part.weights, part.normalize)
            else:
                z = self.fragments(part)
            if weight != 1:  # CompelForSDXL fails on these (its pooled Compel returns a tuple for '')
                raise RuntimeInputError(".and() weights other than 1 are not supported for SDXL (nor by compel)")
            parts.append(z)
        return np.concatenate(parts)


def _blend(embeddings: list[np.ndarray], weights: list[float], normalize: bool) -> np.ndarray:
    """ref: EmbeddingsProvider.apply_embedding_weights (float32 weights, normalised by their sum)."""
    w = np.asarray(weights, np.float32)
    if normalize:
        w = w / w.sum(dtype=np.float32)
    return (np.stack(embeddings) * w[:, None, None]).sum(axis=0, dtype=np.float32)


def provider(enc: TextEncoder) -> _Provider:
    p = _providers.get(enc)
    if p is None:
        p = _providers[enc] = _Provider(enc)
    return p


def _encode_all(prov: _Provider, texts: list[str], syntax: str) -> list[np.ndarray]:
    """Compel.__call__: every text's conditioning, padded to the longest with empty_z."""
    zs = [prov.conditioning(parse(t, syntax)) for t in texts]
    length = max(len(z) for z in zs)
    return [prov.pad_to(z, length) for z in zs]


def encode_weighted(
    encoders: list[TextEncoder],
    prompts: list[str],
    prompts_2: list[str],
    negatives: list[str] | None,
    negatives_2: list[str] | None,
    syntax: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """ref: CompelForSDXL.__call__ (main prompt to text_encoder, style prompt to text_encoder_2 and the pooled
    embedding): (embeds [B, n*77, D], pooled [B, P], negative embeds, negative pooled), all padded to one n.
    With one encoder (the refiner) it gets `prompts` as in runtime.text.encode_prompt."""
    b = len(prompts)
    per_encoder = []
    for k, enc in enumerate(encoders):
        texts = list(prompts if k == 0 else prompts_2)
        if negatives is not None:
            texts += negatives if k == 0 else negatives_2
        per_encoder.append((provider(enc), _encode_all(provider(enc), texts, syntax), texts))
    length = max(len(zs[0]) for _, zs, _ in per_encoder)
    rows = len(per_encoder[0][2])
    hidden = np.stack(
        [np.concatenate([p.pad_to(zs[i], length) for p, zs, _ in per_encoder], axis=-1) for i in range(rows)]
    )  # [rows, n*77, sum of D]
    pooled_prov = next(((p, t) for (p, _, t), e in zip(per_encoder, encoders, strict=True) if e.has_pooled), None)
    if pooled_prov is None:
        raise RuntimeInputError("no text encoder has a pooled projection output (text_embeds)")
    pooled = pooled_prov[0].pooled(pooled_prov[1])
    if negatives is None:
        return hidden[:b], pooled[:b], None, None
    return hidden[:b], pooled[:b], hidden[b:], pooled[b:]


def embeds_for(
    encoders, prompt, prompt_2, negative_prompt, negative_prompt_2, num_images_per_prompt, do_cfg,
    force_zeros_for_empty_prompt, clip_skip, syntax,
) -> PromptEmbeds:  # fmt: skip
    """runtime.text.encode_prompt's contract for prompt_syntax compel / a1111."""
    from runtime.text import _as_list

    if clip_skip is not None:
        raise RuntimeInputError(f"clip_skip works with prompt_syntax='plain' only (not {syntax!r})")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    batch = len(prompts)
    prompts_2 = _as_list(prompt_2, batch, "prompt_2") or prompts
    zero_negative = negative_prompt is None and force_zeros_for_empty_prompt
    negatives = negatives_2 = None
    if do_cfg and not zero_negative:
        negative_prompt = negative_prompt or ""
        negatives = _as_list(negative_prompt, batch, "negative_prompt")
        negatives_2 = _as_list(negative_prompt_2 or negative_prompt, batch, "negative_prompt_2")
    embeds, pooled, neg, neg_pooled = encode_weighted(encoders, prompts, prompts_2, negatives, negatives_2, syntax)
    if do_cfg and zero_negative:
        neg, neg_pooled = np.zeros_like(embeds), np.zeros_like(pooled)

    def repeat(x):
        return None if x is None else np.repeat(x, num_images_per_prompt, axis=0)

    return PromptEmbeds(repeat(embeds), repeat(pooled), repeat(neg), repeat(neg_pooled))
