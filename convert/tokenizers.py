r"""diffusers tokenizer/ and tokenizer_2/ folders -> openvino_tokenizer.xml/.bin (+ the original files).

ref: transformers CLIPTokenizer (tokenizers backend), called as diffusers does:
    tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
The IR has the interface of optimum-intel's export (one string input [B]; outputs input_ids and attention_mask,
int64 [B, 77]). It is openvino-tokenizers' conversion with the steps that give other ids than transformers
replaced (each has a test in tests/test_tokenizers.py):
1. An added token typed in the prompt went through BPE with the "</w>" suffix: "<|endoftext|>" gave
   [49407, 27, 14, 86, 29], and tokenizer_2's pad "!", a special token there, gave "!</w>" = 256 where
   transformers gives 0 for every "!". The BPE vocab maps token + "</w>" to the token's id instead.
2. Added tokens with normalized=True ("<|startoftext|>"; "<|endoftext|>" in tokenizer_2) were matched on the raw
   text only, so "<|StartOfText|>" became BPE pieces; they are now also isolated after normalization.
3. Lowercase was Unicode simple case folding (µ -> μ, ſ -> s, ς -> σ, İ kept, ...) and NFC only composed single
   chars' decompositions: a charsmap generated from the `tokenizers` normalizers replaces both.
4. The regex engine's Unicode tables for \p{L}, \p{N}, \s differ from Oniguruma's in `tokenizers` (4657 chars of
   Unicode 16/17, U+180E): the classes are written out as explicit ranges.
Not fixed: NFC of two or more combining marks that canonical ordering moves past each other (convert/clip_unicode.py).
"""

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openvino as ov
import regex
from openvino.utils.types import make_constant_node
from openvino_tokenizers import _get_factory
from openvino_tokenizers.constants import ATTENTION_MASK_INPUT_NAME, TOKEN_IDS_INPUT_NAME
from openvino_tokenizers.hf_parser import TransformersTokenizerPipelineParser
from openvino_tokenizers.tokenizer_pipeline import (
    BPETokenizationStep,
    CaseFoldStep,
    NormalizationStep,
    NormalizeUnicode,
    RegexNormalizationStep,
    RegexSplitStep,
    SpecialToken,
    SpecialTokensSplit,
    TokenizerPipeline,
)
from openvino_tokenizers.utils import (
    TokenzierConversionParams,
    change_outputs_type,
    quote_meta,
    update_rt_info_with_environment,
    update_rt_info_with_params,
)
from transformers import CLIPTokenizer, PreTrainedTokenizerBase

from convert.clip_unicode import clip_normalizer_map, compile_charsmap, explicit_classes

TOKENIZER_XML = "openvino_tokenizer.xml"
# the normalizer of transformers' CLIPTokenizer (tokenization_clip.py), the only one this module converts
CLIP_NORMALIZERS = [
    {"type": "NFC"},
    {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
    {"type": "Lowercase"},
]


@dataclass
class CharsMapStep(NormalizationStep):
    """CharsMapNormalization with a given precompiled map (openvino-tokenizers' CharsmapStep would be merged
    with, and overridden by, the NFC map)."""

    charsmap: bytes = field(default=b"", repr=False)

    def get_ov_subgraph(self, input_nodes: list) -> list:
        charsmap = make_constant_node(np.frombuffer(self.charsmap, dtype=np.uint8), ov.Type.u8)
        attrs = {"normalization_form": "", "add_dummy_prefix": False, "remove_extra_whitespaces": False}
        attrs |= {"escape_whitespaces": False, "case_fold": False, "nmt": False}
        return _get_factory().create("CharsMapNormalization", [*input_nodes, *charsmap.outputs()], attrs).outputs()


def _fix_added_token_ids(bpe: BPETokenizationStep, added: dict[str, int], raw: set[str]) -> None:
    """Make the BPE op turn an added token piece into its id.

    The op appends the end-of-word suffix to every piece before its longest-match lookup, so the vocab entry
    at the token's id becomes token + suffix. When that string is already a token (tokenizer_2's pad "!":
    "!</w>" = 256), the two entries swap ids; only valid because a raw-matched one-char token can never reach
    the BPE as ordinary text (every occurrence is split off before normalization).
    """
    vocab = bpe.vocab
    for token, idx in added.items():
        assert vocab[idx] == token, (token, idx, vocab[idx])
        suffixed = token + bpe.end_suffix
        if suffixed in vocab:
            assert token in raw and len(token) == 1, f"cannot give {token!r} its own id in the BPE vocab"
            vocab[vocab.index(suffixed)] = token
        vocab[idx] = suffixed
    bpe.added_tokens = None  # would write the unsuffixed tokens back over these entries


def _split_normalized_tokens(steps: list, tokens: list[str]) -> None:
    """Isolate the normalized added tokens after normalization and keep them whole through pre-tokenization.

    (A second SpecialTokensSplit would be the natural op, but openvino-tokenizers 2026.4 crashes compiling one
    that takes skip flags: its cloning constructor reads the pattern from input 5, which is then the flags.)
    The isolating split runs first; both pre-tokenizer regexes then match such a piece whole: CLIP's pattern
    starts with its two special tokens, the byte-level one gets the same alternatives prepended.
    """
    if not tokens:
        return
    alternatives = "|".join(quote_meta(t) for t in tokens)
    first, byte_level = (i for i, s in enumerate(steps) if isinstance(s, RegexSplitStep))
    for t in tokens:
        if (m := regex.match(steps[first].split_pattern, t)) is None or m.group() != t:
            raise NotImplementedError(f"pre-tokenizer splits {t!r}: {steps[first].split_pattern}")
    steps[byte_level].split_pattern = f"{alternatives}|{steps[byte_level].split_pattern}"
    steps.insert(first, RegexSplitStep(alternatives, invert=False, behaviour="isolate", mergeable=False))


def build_pipeline(hf_tokenizer: PreTrainedTokenizerBase, params: TokenzierConversionParams) -> TokenizerPipeline:
    parser = TransformersTokenizerPipelineParser(hf_tokenizer, params)
    if parser.tokenizer_json["normalizer"] != {"type": "Sequence", "normalizers": CLIP_NORMALIZERS}:
        raise NotImplementedError(f"not a CLIP normalizer: {parser.tokenizer_json['normalizer']}")
    pipeline = parser.parse()

    added = {t.content: i for i, t in hf_tokenizer.added_tokens_decoder.items()}
    for t in hf_tokenizer.added_tokens_decoder.values():
        if t.lstrip or t.rstrip or t.single_word:
            raise NotImplementedError(f"added token options not supported: {t!r}")
    raw = {t.content for t in hf_tokenizer.added_tokens_decoder.values() if not t.normalized}
    normalize = hf_tokenizer.backend_tokenizer.normalizer.normalize_str
    normalized = {normalize(t.content) for t in hf_tokenizer.added_tokens_decoder.values() if t.normalized}

    steps = pipeline.steps
    kinds = [type(s) for s in steps[:4]]
    if kinds != [SpecialTokensSplit, NormalizeUnicode, RegexNormalizationStep, CaseFoldStep]:
        raise NotImplementedError(f"unexpected openvino-tokenizers pipeline: {kinds}")
    steps[0] = SpecialTokensSplit([SpecialToken(t) for t in sorted(raw, key=len, reverse=True)])
    # lowercase(NFC(x)) in one map, then \s+ -> " " (lowercasing never creates or removes whitespace)
    steps[1:4] = [CharsMapStep(charsmap=compile_charsmap(clip_normalizer_map())), steps[2]]
    _split_normalized_tokens(steps, sorted(normalized, key=len, reverse=True))
    for step in steps:
        step.set_pipeline(pipeline)
        if isinstance(step, RegexSplitStep):  # transformers' Unicode classes, not the regex engine's
            step.split_pattern = explicit_classes(step.split_pattern)
        elif isinstance(step, RegexNormalizationStep):
            step.regex_search_pattern = explicit_classes(step.regex_search_pattern)
    bpe = next(s for s in steps if isinstance(s, BPETokenizationStep))
    _fix_added_token_ids(bpe, added, raw)
    return pipeline


def ov_tokenizer_model(hf_tokenizer: PreTrainedTokenizerBase) -> ov.Model:
    """Padded to model_max_length (77) and truncated, like diffusers' call."""
    params = TokenzierConversionParams(use_max_padding=True, truncation=True, max_length=hf_tokenizer.model_max_length)
    model = build_pipeline(hf_tokenizer, params).get_tokenizer_ov_subgraph()
    # the outputs and types of openvino_tokenizers.convert_tokenizer (what optimum-intel exports)
    names = (TOKEN_IDS_INPUT_NAME, ATTENTION_MASK_INPUT_NAME)
    outputs = [next(o for o in model.outputs if name in o.names) for name in names]
    result = ov.Model(outputs, model.get_parameters(), "tokenizer")
    result.add_sinks(model.get_sinks())  # the "truncation" state variable
    result = change_outputs_type(result, ov.Type.i64)
    update_rt_info_with_params(result, hf_tokenizer, params)
    update_rt_info_with_environment(result)
    return result


def convert_tokenizer(src_dir: Path, out_dir: Path) -> None:
    """src_dir: a diffusers tokenizer folder. Writes out_dir/openvino_tokenizer.xml/.bin and copies the
    original files beside it; built in a sibling folder and renamed when complete."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(out_dir)
    hf_tokenizer = CLIPTokenizer.from_pretrained(src_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for f in sorted(src_dir.iterdir()):
        if f.is_file():
            shutil.copy2(f, partial / f.name)
    ov.save_model(ov_tokenizer_model(hf_tokenizer), partial / TOKENIZER_XML)
    partial.rename(out_dir)
