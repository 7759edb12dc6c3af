"""OpenVINO tokenizers vs transformers' CLIPTokenizer (what diffusers calls), on SDXL's two tokenizer folders."""

import json
import subprocess
import sys
import unicodedata

import numpy as np
import openvino as ov
import pytest
import regex

transformers = pytest.importorskip("transformers")

from convert.clip_unicode import clip_normalizer_map, clip_regex_classes  # noqa: E402
from convert.clip_vocab import write_clip_tokenizer  # noqa: E402
from convert.tokenizers import convert_tokenizer  # noqa: E402
from runtime.tokenizer import Tokenizer  # noqa: E402

PADS = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
LONG = "a highly detailed photograph of a majestic lion standing on a rock at sunset, " * 6
PROMPTS = {
    "plain": "a photo of an astronaut riding a horse on mars",
    "empty": "",
    "contractions": "it's a dog's life, isn't it? they're here, we've won, I'm ok, you'll see, he'd go",
    "upper_contractions": "IT'S DON'T THEY'RE WE'LL",
    "apostrophes": "rock 'n' roll 'sup 'twas ''quoted'' ' s 'S",
    "curly_quotes": "don’t won’t ‘smart quotes’ “double”",
    "bang_end": "ends with a bang!",
    "bangs": "wow!!! great!",
    "bang_only": "!",
    "punct_runs": "!!!???...;;; --- *** @@@ ### $$$ %%% ~~~",
    "html_entities": "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;x&#39; &nbsp;",
    "accents": "café naïve résumé Ångström Zoë",
    "decomposed_accents": "cafe\u0301 e\u0301 n\u0303 Vie\u0323\u0302t",
    "mark_on_precomposed": "é\u0323 ê\u0323 Å\u0301 ọ\u0302",
    "hangul_jamo": "\u1100\u1161\u11a8 \uac00\u11a8 한국어",
    "cjk": "東京の夜景、桜が咲く。中文",
    "emoji": "🐱🚀 emoji 👩‍👩‍👧 family 👍🏽 flags 🇫🇷",
    "whitespace": "a   b\t\tc\n\nd  \r\n e\x0bf\x0cg",
    "unicode_spaces": "nbsp\u00a0here em\u2003space ideo\u3000space nel\u0085 lsep\u2028 mvs\u180eX",
    "leading_trailing_spaces": "   leading and trailing   ",
    "numbers": "1234567 3.14159 1,000,000 2nd 4k 8K 1girl ٣٤ ½ ² Ⅻ ①",
    "over_77_tokens": LONG,
    "exactly_77_tokens": "x " * 75,
    "76_words": "x " * 76,
    "long_word": "a" * 300,
    "special_tokens_typed": "hello <|endoftext|> world<|startoftext|>again",
    "special_token_only": "<|endoftext|>",
    "special_tokens_upper": "<|ENDOFTEXT|> upper special <|StartOfText|>",
    "special_token_glued": "!<|StartOfText|>x<|endoftext|>!",
    "zero_width": "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom\u2060wj",
    "fullwidth": "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ ！",
    "ligatures": "ﬁne ﬂour",
    "mixed_scripts": "Привет мир γειά σου مرحبا שלום नमस्ते",
    "sharp_s": "ß straße STRASSE ẞ",
    "sigma": "ΟΔΟΣ ΣΊΣΥΦΟΣ ς σ",
    "turkish_i": "İstanbul I ı DİYARBAKIR",
    "casefold_not_lowercase": "µm ſ ϐ ϑ ϕ ϰ ϱ ϵ ẛ ꭰ Ꭰ ᏸ ͅ",
    "sd_syntax": "masterpiece, (best quality:1.2), [worse], {highres}, <lora:name:0.8>, BREAK",
    "math_letters": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕏𝕐 𝐁𝐨𝐥𝐝",
    "control_chars": "ctrl\x00nul\x07bell\x1besc\x7fdel",
    "new_unicode_letters": "\U00010940\U00010941x \u088fa \ua7ce \U00011de0 \U000323b0",
    "url": "email@example.com https://example.com/path?q=1&x=2#frag",
    "titlecase": "ǅemal ǈ ǋ",
    "compatibility_chars": "ÅΩK \u212b\u2126\u212a ﾊﾝｶｸ ｶﾞ",
}


@pytest.fixture(scope="session")
def tokenizer_root(tmp_path_factory):
    """src/<name>: the folders write_clip_tokenizer writes; ov/<name>: what convert_tokenizer makes of them."""
    root = tmp_path_factory.mktemp("tokenizers")
    for name, pad in PADS.items():
        convert_tokenizer(write_clip_tokenizer(root / "src" / name, pad), root / "ov" / name)
    return root


@pytest.fixture(scope="session")
def tokenizers(tokenizer_root):
    """{name: (transformers CLIPTokenizer, runtime Tokenizer)} for SDXL's tokenizer/ and tokenizer_2/."""
    core = ov.Core()
    return {
        name: (
            transformers.CLIPTokenizer.from_pretrained(tokenizer_root / "src" / name),
            Tokenizer(core, tokenizer_root / "ov" / name / "openvino_tokenizer.xml"),
        )
        for name in PADS
    }


def reference(hf, prompts: list[str]) -> np.ndarray:
    # ref: diffusers StableDiffusionXLPipeline.encode_prompt
    return hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids


def assert_same_ids(hf, ov_tokenizer, prompts: list[str]) -> None:
    expected, got = reference(hf, prompts), ov_tokenizer(prompts)
    assert got.dtype == np.int64 and got.shape == (len(prompts), 77)
    for p, e, g in zip(prompts, expected, got, strict=True):
        assert g.tolist() == e.tolist(), p


@pytest.mark.parametrize("name", PADS)
@pytest.mark.parametrize("prompt", PROMPTS.values(), ids=PROMPTS.keys())
def test_ids_equal_transformers(tokenizers, name, prompt):
    assert_same_ids(*tokenizers[name], [prompt])


@pytest.mark.parametrize("name", PADS)
def test_batch(tokenizers, name):
    prompts = ["a cat", LONG, "", "wow!!! great!", "<|StartOfText|> İ µ", "x " * 40]
    assert_same_ids(*tokenizers[name], prompts)
    assert_same_ids(*tokenizers[name], list(PROMPTS.values()))


@pytest.mark.parametrize("name", PADS)
def test_pad_ids(tokenizers, name):
    hf, tok = tokenizers[name]
    ids = tok(["a photo"])[0]
    assert ids[:4].tolist() == [49406, 320, 1125, 49407]
    assert (ids[4:] == {"tokenizer": 49407, "tokenizer_2": 0}[name]).all()


def test_unicode_class_differences(tokenizers):
    """Chars in \\p{L}/\\p{N} for newer Unicode (`regex`) but not for transformers, in letter/digit/punct context."""
    hf, tok = tokenizers["tokenizer"]
    members = set()
    for ranges in clip_regex_classes().values():
        for a, b in regex.findall(r"\\x\{([0-9a-f]+)\}(?:-\\x\{([0-9a-f]+)\})?", ranges):
            members.update(range(int(a, 16), int(b or a, 16) + 1))
    chars = "".join(chr(c) for c in range(1, 0x110000) if not 0xD800 <= c < 0xE000)
    differ = [c for c in regex.findall(r"[\p{L}\p{N}\s]", chars) if ord(c) not in members] + ["\u180e"]
    assert len(differ) > 4000
    assert_same_ids(hf, tok, [f"a{c}a 1{c}1 .{c}. {c}{c}X" for c in differ])


def test_normalizer_map_changes(tokenizers):
    """Every key of the lowercase(NFC) map (chars, decompositions, mark pairs), alone and before a letter."""
    hf, tok = tokenizers["tokenizer_2"]
    keys = sorted(k for k in clip_normalizer_map() if "\n" not in k)
    prompts = [f"{k} {k}y" for k in keys]
    assert_same_ids(hf, tok, prompts)


def test_known_limitation_combining_marks(tokenizers):
    """Two marks NFC reorders or composes past each other: a longest-match map cannot express it (see report)."""
    hf, tok = tokenizers["tokenizer"]
    prompt = "e\u0301\u0323"  # NFC: ẹ + U+0301
    assert unicodedata.normalize("NFC", prompt) == "\u1eb9\u0301"
    assert tok([prompt]).tolist() != reference(hf, [prompt]).tolist()


def test_vocab_matches_open_clip(tmp_path):
    folder = write_clip_tokenizer(tmp_path / "tokenizer_2", "!")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    known = {"!": 0, "a</w>": 320, "photo</w>": 1125, "!</w>": 256, "<|startoftext|>": 49406, "<|endoftext|>": 49407}
    assert {k: vocab[k] for k in known} == known
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    assert all(vocab["".join(m.split())] == 512 + i for i, m in enumerate(merges[1:]))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "CLIPTokenizer" and config["model_max_length"] == 77
    assert config["pad_token"] == "!" and config["do_lower_case"] and not config["add_prefix_space"]
    special = json.loads((folder / "special_tokens_map.json").read_text())
    assert special["pad_token"] == "!" and special["eos_token"]["content"] == "<|endoftext|>"
    hf = transformers.CLIPTokenizer.from_pretrained(folder)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.model_max_length) == (0, 49406, 49407, 77)


@pytest.mark.parametrize("name", PADS)
def test_converted_folder_layout(tokenizer_root, name):
    src, out = tokenizer_root / "src" / name, tokenizer_root / "ov" / name
    assert {f.name for f in out.iterdir()} == {f.name for f in src.iterdir()} | {
        "openvino_tokenizer.xml",
        "openvino_tokenizer.bin",
    }
    assert not list(tokenizer_root.glob("ov/*.partial"))
    model = ov.Core().read_model(out / "openvino_tokenizer.xml")
    assert [o.names for o in model.outputs] == [{"input_ids"}, {"attention_mask"}]
    assert model.input(0).get_element_type() == ov.Type.string
    with pytest.raises(FileExistsError):
        convert_tokenizer(src, out)


def test_optimum_style_export_loads(tmp_path):
    """openvino_tokenizers.convert_tokenizer defaults, as optimum-intel exports: padded/truncated here to 77."""
    from openvino_tokenizers import convert_tokenizer as ov_convert

    src = write_clip_tokenizer(tmp_path / "tokenizer_2", "!")
    hf = transformers.CLIPTokenizer.from_pretrained(src)
    ov.save_model(ov_convert(hf, with_detokenizer=True)[0], tmp_path / "openvino_tokenizer.xml")
    tok = Tokenizer(ov.Core(), tmp_path / "openvino_tokenizer.xml")
    prompts = ["a photo of a cat", LONG, "café", ""]
    assert_same_ids(hf, tok, prompts)
    assert_same_ids(hf, tok, ["a cat"])  # padded by the runtime
    assert tok(["wow!"])[0, 2] == 256  # upstream keeps "!</w>": the difference convert/tokenizers.py fixes


def test_runtime_errors(tokenizers, tmp_path):
    with pytest.raises(FileNotFoundError, match="openvino_tokenizer.xml"):
        Tokenizer(ov.Core(), tmp_path / "openvino_tokenizer.xml")
    _, tok = tokenizers["tokenizer"]
    with pytest.raises(TypeError):
        tok("a string, not a list")
    with pytest.raises(ValueError, match="NUL"):
        tok(["ends with nul\0"])
    assert tok([]).shape == (0, 77)


def test_runtime_is_torch_free():
    code = (
        "import sys, runtime.tokenizer; "
        "banned = {'torch', 'transformers', 'diffusers', 'tokenizers', 'convert'}; "
        "bad = banned & {m.split('.')[0] for m in sys.modules}; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tables_are_kept_between_conversions(tmp_path, monkeypatch):
    """The ~10 s tables come from the user's cache; a damaged file is rebuilt; an unwritable cache is skipped.
    (What a stored table holds is checked by test_normalizer_map_changes / test_unicode_class_differences.)"""
    from convert import clip_unicode

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    table = {"e\u0301": "\u00e9", "\U0001e900": "\U0001e922", "\u00c5": "\u00e5", "\\x{41}": "-"}
    calls = []

    def build():
        calls.append(1)
        return dict(table)

    assert clip_unicode._stored("t", build) == table and len(calls) == 1
    (stored,) = clip_unicode.table_dir().glob("t-*.json")
    assert clip_unicode._stored("t", build) == table and len(calls) == 1  # read back, not built
    stored.write_text('{"e": ')  # a torn write by something else
    assert clip_unicode._stored("t", build) == table and len(calls) == 2
    assert json.loads(stored.read_text()) == table and not list(stored.parent.glob(".t-*"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(stored))  # a file where the folder should be: not writable
    assert clip_unicode._stored("t", build) == table and len(calls) == 3
