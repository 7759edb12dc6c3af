"""Prompt weighting and long prompts (issue 20): compel 2.5.1's CompelForSDXL is the reference.

Parser tests compare runtime.prompts with compel's PromptParser; embedding tests compare runtime.weighting with
CompelForSDXL on the tiny SDXL (both tokenizers and text encoders); the image test gives diffusers compel's
embeddings and our pipeline the prompt with prompt_syntax="compel"."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import RuntimeInputError
from runtime.prompts import Blend, parse
from tests import cli
from tests.parity import assert_parity, diffusers_pipe, our_pipe, run_diffusers, run_ours

LONG = ", ".join(f"a {c} stone" for c in ("red", "green", "blue", "grey", "white", "black") * 5)  # ~2 chunks
LONG_3 = "a castle on a hill. " * 12 + "(golden light)1.3, (fog)0.6, " + "tall towers, " * 40  # 3 chunks
PROMPTS = [
    "a photo of a cat",
    "a (red cat)1.3 sits on a mat",
    "a cat++ and a dog--",
    "a (very (tiny)1.5 house)0.7 in a forest",
    "(a lighthouse)0.5 at dawn",
    "a lighthouse at (dawn)0",
    '"a red cube"1.2 next to a blue sphere',
    "(masterpiece, best quality)1.2, a portrait",
    "red-haired girl- in a field+",
    "a (cat).attend(1.4) on a sofa",
    "(a)1.1 (b)0.9 (c)1.2 (d)0.8",
    "word+++ word---",
    "\\(not weighted\\) text",
    "a, b,c,(d)1.1,e",
    "(1.5 apples)2 on a table",
    "",
    "   ",
    "(),",
    "a cat. a dog. a bird.",
    '("a cat", "a dog").blend(0.7, 0.3)',
    '("a cat", "a (dog)1.3").blend(1, 1)',
    '("a cat", "a dog").blend(1, 3, no_normalize)',
    '("a cat", "a dog").and()',
    '("a (cat)0.5", "a dog++").and()',
    '(cat, "a dog", (a bird)).and()',
    LONG,
    LONG_3,
    LONG + ", (a small boat)1.4, (clouds)0.5",
    "(" + LONG + ")0.8",  # a fragment across the chunk boundary, masked with compel's boundary rule
    " ".join(["word"] * 80),  # no punctuation: split at a word end
    "x" * 400,  # no word end in the first 75 tokens: split anywhere
    '("' + LONG + '", "a short one").blend(0.5, 0.5)',
]


# ---------------------------------------------------------------------------------------------------- parser
def _compel_parse(s):
    from compel.prompt_parser import Blend as CBlend
    from compel.prompt_parser import PromptParser

    c = PromptParser().parse_conjunction(s)
    parts = []
    for p in c.prompts:
        if isinstance(p, CBlend):
            prompts = [[(f.text, f.weight) for f in q.children] for q in p.prompts]
            parts.append((prompts, p.weights, p.normalize_weights))
        else:
            parts.append([(f.text, f.weight) for f in p.children])
    return parts, c.weights


def _ours(s):
    r = parse(s, "compel")
    parts = []
    for p in r.parts:
        if isinstance(p, Blend):
            parts.append(([q[0] for q in p.prompts], p.weights, p.normalize))
        else:
            assert len(p) == 1  # compel has one segment
            parts.append(p[0])
    return parts, r.weights


@pytest.mark.parametrize("prompt", PROMPTS + ["(a)-1", "(a)1.3b", "(a)+1.5", "(x)(y)1.2", "cat+ +dog", "(a)1e3"])
def test_compel_parser_equals_compel(prompt):
    assert _ours(prompt) == _compel_parse(prompt)


def test_compel_parser_random_prompts():
    """Random prompts from syntax pieces: where compel's grammar parses them we give its fragments; where compel
    falls back to literal text (an unbalanced parenthesis) we raise, never give another reading."""
    rng = np.random.default_rng(0)
    pieces = ["a", "cat", "red-haired", " ", " ", "(", ")", '"', "1.2", "0.5", "+", "-", "++", ",", ".", "\\(", "2"]
    agreed = refused = 0
    for _ in range(250):
        s = "".join(rng.choice(pieces, size=rng.integers(1, 9)))
        try:
            ours = _ours(s)
        except RuntimeInputError:
            refused += 1
            ref_texts = "".join(t for part in _compel_parse(s)[0] for t, _ in part)
            assert any(c in ref_texts for c in '()"'), s  # compel read it literally too
            continue
        assert ours == _compel_parse(s), s
        agreed += 1
    assert agreed > 60 and refused > 40


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a (red:1.3) cat", [[("a ", 1.0), ("red", 1.3), (" cat", 1.0)]]),
        ("(a)", [[("a", 1.1)]]),
        ("((a))", [[("a", 1.1 * 1.1)]]),
        ("[a]", [[("a", 1 / 1.1)]]),
        ("(a [b] c:1.5) d", [[("a ", 1.5), ("b", 1.5 / 1.1), (" c", 1.5), (" d", 1.0)]]),
        ("x \\(y\\) \\[z\\]", [[("x (y) [z]", 1.0)]]),
        ("a BREAK b BREAK (c:0.5)", [[("a", 1.0)], [("b", 1.0)], [("c", 0.5)]]),
        ("time: 5pm", [[("time: 5pm", 1.0)]]),
        ("", [[("", 1.0)]]),
    ],
)
def test_a1111_translation(prompt, expected):
    parsed = parse(prompt, "a1111")
    assert parsed.weights == [1.0] and len(parsed.parts) == 1
    got = parsed.parts[0]
    assert [[t for t, _ in seg] for seg in got] == [[t for t, _ in seg] for seg in expected]
    np.testing.assert_allclose([w for seg in got for _, w in seg], [w for seg in expected for _, w in seg])


@pytest.mark.parametrize(
    "syntax, prompt, needle",
    [
        ("compel", "a (red cat", "unbalanced"),
        ("compel", "a red cat)1.2", "unbalanced"),
        ("compel", 'a "red cat', "unbalanced a quote"),
        ("compel", "(a + b)1.2", "cannot parse"),
        ("compel", '("a", "b").and() trailing', "text after .and()"),
        ("compel", '("a", "b").blend(0.5, x)', "not a number"),
        ("compel", '("a", "b").blend(0.5)', "1 weights for 2 prompts"),
        ("compel", '("a", "b").and(1, 0.5)', ".and() weights"),
        ("compel", "a cat.swap(dog)", ".swap()"),
        ("compel", "withLora(x, 0.5) a cat", "withLora"),
        ("a1111", "a (red cat", "never closed"),
        ("a1111", "a [red cat", "never closed"),
        ("a1111", "a red cat)", "closes nothing"),
        ("a1111", "(red:abc) cat", "'abc' is not a number"),
        ("a1111", "(red:1.2.3) cat", "'1.2.3' is not a number"),
        ("a1111", "[cat:dog:0.5]", "prompt editing"),
        ("a1111", "a [cat|dog]", "alternation"),
        ("a1111", "<lora:x:1> a cat", "extra networks"),
    ],
)
def test_bad_syntax_is_one_line_error(syntax, prompt, needle):
    from runtime.params import GenerationParams

    with pytest.raises(RuntimeInputError) as e:
        GenerationParams.create(prompt="fine", negative_prompt=prompt, prompt_syntax=syntax)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_syntax_options():
    from runtime.params import GenerationParams

    with pytest.raises(RuntimeInputError, match="prompt_syntax='markdown'"):
        GenerationParams.create(prompt="a", prompt_syntax="markdown")
    with pytest.raises(RuntimeInputError, match="clip_skip works with prompt_syntax='plain' only"):
        GenerationParams.create(prompt="a", prompt_syntax="compel", clip_skip=1)
    GenerationParams.create(prompt="a (b", prompt_syntax="plain")  # plain: the text as written


# ---------------------------------------------------------------------------------------------------- embeddings
@pytest.fixture(scope="module")
def base(tiny):
    import torch
    from compel import CompelForSDXL

    src, ov_dir = tiny("base")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # compel's many tiny encoder calls: 5x faster on one thread on this shared CPU
    yield CompelForSDXL(diffusers_pipe(str(src))), our_pipe(str(ov_dir)), src, ov_dir
    torch.set_num_threads(threads)


def _ours_embeds(pipe, prompt, negative, syntax="compel", prompt_2=None, negative_2=None):
    from runtime.text import encode_prompt

    return encode_prompt(pipe.text_encoders, prompt, prompt_2, negative, negative_2, 1, True, True, None,
                         prompt_syntax=syntax)  # fmt: skip


def _no_grad():
    import torch

    return torch.no_grad()


def _compare(got, ref, negative=True):
    pairs = [(got.embeds, ref.embeds), (got.pooled, ref.pooled_embeds)]
    if negative:
        pairs += [(got.negative_embeds, ref.negative_embeds), (got.negative_pooled, ref.negative_pooled_embeds)]
    for ours, theirs in pairs:
        assert ours.shape == tuple(theirs.shape)
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5)


def test_embeddings_equal_compel_batch(base):
    """All prompts in one CompelForSDXL call (each padded to the longest, 3 chunks) and one of ours."""
    compel, pipe, _, _ = base
    with _no_grad():
        ref = compel(PROMPTS, negative_prompt="blurry, (ugly)0.7, lowres")  # one negative for all
    got = _ours_embeds(pipe, PROMPTS, "blurry, (ugly)0.7, lowres")
    assert got.embeds.shape[1] == 3 * 77
    _compare(got, ref)


@pytest.mark.parametrize(
    "prompt, negative, chunks",
    [
        ("a (red cat)1.3 sits", "(blurry)0.5", 1),
        (LONG, "blurry", 2),  # the negative padded to the prompt's 2 chunks
        ("a cat", LONG_3 + " (ugly)0.8", 3),  # the prompt padded to the negative's 3 chunks
        ('("a cat", "a dog").and()', LONG, 2),
        ('("a cat", "' + LONG + '").blend(0.3, 0.7)', "", 2),
    ],
)
def test_embeddings_equal_compel_per_prompt(base, prompt, negative, chunks):
    compel, pipe, _, _ = base
    with _no_grad():
        ref = compel(prompt, negative_prompt=negative)
    got = _ours_embeds(pipe, prompt, negative)
    assert got.embeds.shape[1] == chunks * 77
    _compare(got, ref)


def test_style_prompt_and_zero_negative(base):
    """prompt_2 is compel's style prompt (text_encoder_2 and the pooled embedding), of another length than the
    main prompt; without a negative prompt the negatives are zeros of the padded length (diffusers' rule)."""
    compel, pipe, _, _ = base
    with _no_grad():
        ref = compel("a (cat)1.2", style_prompt=LONG + ", (oil painting)1.3")
    got = _ours_embeds(pipe, "a (cat)1.2", None, prompt_2=LONG + ", (oil painting)1.3")
    _compare(got, ref, negative=False)
    assert got.negative_embeds.shape == got.embeds.shape and not got.negative_embeds.any()


def test_a1111_uses_compel_weighting(base):
    """A1111's syntax translated: the same embeddings as compel's syntax for the same weights (and BREAK: a
    chunk boundary where compel's split would not put one)."""
    _, pipe, _, _ = base
    a = _ours_embeds(pipe, "a (red cat:1.3) on [a mat]", "(blurry:0.5)", syntax="a1111")
    c = _ours_embeds(pipe, "a (red cat)1.3 on (a mat)0.9090909090909091", "(blurry)0.5", syntax="compel")
    np.testing.assert_array_equal(a.embeds, c.embeds)
    np.testing.assert_array_equal(a.negative_embeds, c.negative_embeds)
    broken = _ours_embeds(pipe, "a red cat BREAK on a mat", "", syntax="a1111")
    two = _ours_embeds(pipe, '("a red cat", "on a mat").and()', "", syntax="compel")
    np.testing.assert_allclose(broken.embeds, two.embeds, atol=1e-6)


def test_refiner_embeddings_equal_compel(tiny, base):  # base: torch on one thread
    """One text encoder (the refiner's text_encoder_2): compel's documented refiner set-up."""
    from compel import Compel, ReturnedEmbeddingsType

    src, ov_dir = tiny("refiner")
    pipe = diffusers_pipe(str(src), True)
    compel = Compel(tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2, truncate_long_prompts=False,
                    returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                    requires_pooled=True)  # fmt: skip
    prompt, negative = LONG + ", (a boat)1.3, (fog)0.5", "(blurry)0.5"
    with _no_grad():
        embeds, pooled = compel([prompt, negative])
    got = _ours_embeds(our_pipe(str(ov_dir)), prompt, negative)
    for ours, theirs in [(got.embeds, embeds[:1]), (got.negative_embeds, embeds[1:]), (got.pooled, pooled[:1]),
                         (got.negative_pooled, pooled[1:])]:  # fmt: skip
        assert ours.shape == tuple(theirs.shape)
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------------- images
def test_image_equals_diffusers_with_compel_embeddings(base):
    """A 2-chunk weighted prompt: the UNet runs at 154 tokens (its own static shape), diffusers gets compel's
    embeddings."""
    compel, _, src, ov_dir = base
    prompt, negative = LONG + ", (a small boat)1.4, (clouds)0.6", "(blurry)0.7, lowres"
    with _no_grad():
        c = compel(prompt, negative_prompt=negative)
    kw = dict(height=64, width=64, num_inference_steps=2, guidance_scale=5.0)
    theirs = run_diffusers(src, 3, prompt_embeds=c.embeds, pooled_prompt_embeds=c.pooled_embeds,
                           negative_prompt_embeds=c.negative_embeds,
                           negative_pooled_prompt_embeds=c.negative_pooled_embeds, **kw)  # fmt: skip
    ours = run_ours(ov_dir, 3, prompt=prompt, negative_prompt=negative, prompt_syntax="compel", **kw)
    assert_parity(ours, theirs)
    unet = our_pipe(str(ov_dir)).unet
    shapes = [dict(e for e in key if len(e) == 2 and isinstance(e[0], str)) for key in unet._compiled]
    assert any(s.get("encoder_hidden_states", (0, 0))[1] == 154 for s in shapes)
    again = run_ours(ov_dir, 3, prompt=prompt, negative_prompt=negative, prompt_syntax="compel", **kw)
    assert len(unet._compiled) == len(shapes)  # compiled once per chunk count, then cached
    np.testing.assert_array_equal(again[1], ours[1])


def test_cli_records_syntax_and_refuses_bad_syntax(base, tmp_path):
    from runtime.image import read_png_parameters

    _, _, _, ov_dir = base
    out = tmp_path / "x.png"
    args = ["--model", ov_dir, "--steps", "1", "--height", "64", "--width", "64", "--seed", "1", "--quiet"]
    proc = cli.run("runtime.generate", *args, "--prompt", "a (cat:1.2)", "--prompt-syntax", "a1111", "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert read_png_parameters(out)["prompt_syntax"] == "a1111"
    from PIL import Image

    with Image.open(out) as im:
        assert "Prompt syntax: a1111" in im.text["parameters"]
    bad = cli.run("runtime.generate", *args, "--prompt", "a (cat:x)", "--prompt-syntax", "a1111", "--output",
                  tmp_path / "y.png")  # fmt: skip
    cli.assert_one_line_error(bad, "'x' is not a number")
