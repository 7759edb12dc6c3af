"""Write a CLIP tokenizer folder (as in SDXL's tokenizer/ and tokenizer_2/) from open-clip's BPE file.

ref: openai/CLIP clip/simple_tokenizer.py SimpleTokenizer.__init__ (vocab order) and the files of
stabilityai/stable-diffusion-xl-base-1.0 tokenizer/ (pad "<|endoftext|>") and tokenizer_2/ (pad "!").
Stdlib only, so tests and demos build tiny SDXL pipelines without downloading a tokenizer.
"""

import gzip
import importlib.metadata
import json
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # 48894: the BPE file's first line is a header, CLIP keeps this many merges
VOCAB_SIZE = 2 * 256 + N_MERGES + 2  # bytes, bytes + "</w>", merges, BOS/EOS = 49408


def _bpe_file() -> Path:
    files = importlib.metadata.files("open-clip-torch") or []
    found = [f for f in files if f.name == "bpe_simple_vocab_16e6.txt.gz"]
    if not found:
        raise FileNotFoundError("open_clip/bpe_simple_vocab_16e6.txt.gz not found: install open-clip-torch")
    return Path(found[0].locate())


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char map (ref: openai/CLIP simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def clip_merges(bpe_path: Path | None = None) -> list[tuple[str, str]]:
    lines = gzip.open(bpe_path or _bpe_file()).read().decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == VOCAB_SIZE, len(vocab)
    return vocab


def _added_token(content: str) -> dict:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_clip_tokenizer(out_dir: Path, pad_token: str) -> Path:
    """vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json: loads with CLIPTokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = clip_merges()
    vocab = clip_vocab(merges)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out_dir / "merges.txt").write_text(merges_txt, encoding="utf-8")

    special = {"bos_token": _added_token(BOS), "eos_token": _added_token(EOS), "unk_token": _added_token(EOS)}
    config = {
        "add_prefix_space": False,
        "bos_token": special["bos_token"],
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": special["eos_token"],
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": special["unk_token"],
    }
    special_map = {k: {f: v for f, v in d.items() if f != "__type"} for k, d in special.items()}
    special_map = dict(sorted({**special_map, "pad_token": pad_token}.items()))
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        (out_dir / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir
