"""Prompts -> CLIP input_ids [B, 77] with an OpenVINO tokenizer model (ours, or optimum-intel's export).

ref: diffusers StableDiffusionXLPipeline.encode_prompt:
    tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
Our openvino_tokenizer.xml (convert/tokenizers.py) pads and truncates to 77 itself and gives transformers' ids.
optimum-intel's has the same interface but pads to the longest prompt and has truncation switched off (a state
variable); both are set here. It keeps openvino-tokenizers' known differences from transformers (an added token
typed in the prompt, tokenizer_2's "!", rare Unicode): convert/tokenizers.py lists them.
"""

import json
import threading
from pathlib import Path

import numpy as np
import openvino as ov
import openvino_tokenizers

from runtime.errors import RuntimeInputError
from runtime.ov_model import ov_error_reason, read_ir

INPUT_IDS = "input_ids"
TRUNCATION_STATE = "truncation"  # openvino_tokenizers TruncationStep.TRUNCATE_ENABLED_VAR_ID


class Tokenizer:
    def __init__(self, core: ov.Core, xml_path: Path, max_length: int = 77):
        xml_path = Path(xml_path)
        if not xml_path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {xml_path}")
        core.add_extension(str(openvino_tokenizers._ext_path))  # the tokenizer ops, for a Core made before import
        model = read_ir(core, xml_path)  # cut, empty or missing files: one RuntimeInputError naming the file
        if len(model.inputs) != 1 or model.input(0).get_element_type() != ov.Type.string:
            names = [p.get_any_name() for p in model.inputs]
            raise RuntimeInputError(f"{xml_path}: not a tokenizer (expected one string input, it has {names})")
        if not any(INPUT_IDS in o.names for o in model.outputs):
            names = [p.get_any_name() for p in model.outputs]
            raise RuntimeInputError(f"{xml_path}: not a tokenizer (no '{INPUT_IDS}' output in {names})")
        self.max_length = max_length
        try:
            pad = int(model.get_rt_info("pad_token_id").astype(int)) if model.has_rt_info("pad_token_id") else None
        except (RuntimeError, ValueError):
            raise RuntimeInputError(f"{xml_path}: its pad_token_id is not an integer") from None
        self.pad_token_id = pad
        try:
            self._request = core.compile_model(model, "CPU").create_infer_request()
        except RuntimeError as e:
            raise RuntimeInputError(f"{xml_path}: cannot compile the tokenizer ({ov_error_reason(e)})") from None
        self._lock = threading.Lock()  # one request (it holds the truncation state): callers take turns
        self._truncation = None
        for state in self._request.query_state():
            if state.name == TRUNCATION_STATE:
                state.state = ov.Tensor(np.array(True))
                self._truncation = state
        self._vocab_path = xml_path.parent / "vocab.json"  # the HF tokenizer files beside the IR: for decoding
        self._decoder: dict[int, str] | None = None

    def _untruncated(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """ids and attention mask without truncation (call with the lock held); the state is restored."""
        self._truncation.state = ov.Tensor(np.array(False))
        try:
            out = self._request.infer([np.array(texts, dtype=np.str_)])
            mask = next((v for k, v in out.items() if "attention_mask" in k.names), None)
            return out[INPUT_IDS].astype(np.int64), mask
        finally:
            self._truncation.state = ov.Tensor(np.array(True))

    def id_to_token(self) -> dict[int, str]:
        """vocab.json's id -> token string ('.</w>', ...), {} without one (transformers' convert_ids_to_tokens)."""
        if self._decoder is None:
            try:
                vocab = json.loads(self._vocab_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                vocab = {}
            self._decoder = {int(i): tok for tok, i in vocab.items()} if isinstance(vocab, dict) else {}
        return self._decoder

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids with BOS and EOS, neither truncated nor padded (compel's truncate=False tokenizing)."""
        if not texts:
            return []
        with self._lock:
            if self._truncation is not None:
                ids, mask = self._untruncated(list(texts))
            else:
                out = self._request.infer([np.array(list(texts), dtype=np.str_)])
                mask = next((v for k, v in out.items() if "attention_mask" in k.names), None)
                ids = out[INPUT_IDS].astype(np.int64)
        if mask is None:
            raise RuntimeInputError("the tokenizer model has no attention_mask output (needed for prompt weighting)")
        return [[int(i) for i in row[: int(m.sum())]] for row, m in zip(ids, mask, strict=True)]

    def decode(self, ids) -> str:
        """CLIP byte-level BPE ids -> text, from the folder's vocab.json ('' without one).
        # ref: transformers CLIPTokenizer.convert_tokens_to_string, bytes_to_unicode"""
        self.id_to_token()
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        byte_of = {chr(b): b for b in printable}
        rest = (b for b in range(256) if b not in byte_of.values())
        byte_of |= {chr(256 + n): b for n, b in enumerate(rest)} | {" ": 32}  # " ": from the "</w>" word ends
        text = "".join(self._decoder.get(int(i), "") for i in ids).replace("</w>", " ")
        return bytes(byte_of.get(c, ord("?")) for c in text).decode("utf-8", errors="replace").strip()

    def truncated(self, texts: list[str], ids: np.ndarray) -> list[tuple[int, str]]:
        """(row, the text cut off at max_length) for each text this tokenizer truncated, `ids` being its output for
        `texts` (what diffusers' warning names; '' where no vocab.json lets us decode). Only full rows (EOS after
        a text token, where a padded row ends in two equal ids) are tokenized again, without truncation."""
        full = [i for i in range(len(texts)) if ids.shape[1] >= self.max_length and ids[i, -1] != ids[i, -2]]
        if not full or self._truncation is None:
            return []
        with self._lock:
            long_ids, mask = self._untruncated([texts[i] for i in full])
        out = []
        for k, i in enumerate(full):
            n = int(mask[k].sum()) if mask is not None else long_ids.shape[1]
            if n > self.max_length:  # ref: diffusers encode_prompt: batch_decode(untruncated_ids[:, 76:-1])
                cut = long_ids[k, self.max_length - 1 : n - 1]
                out.append((i, self.decode(cut) or f"<{len(cut)} tokens>"))
        return out

    def __call__(self, texts: list[str]) -> np.ndarray:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"expected a list of str, got {type(texts).__name__}")
        if any(t.endswith("\0") for t in texts):
            # OpenVINO's Python string tensors go through numpy, which drops trailing NULs
            raise ValueError("a prompt ends with a NUL character, which OpenVINO string tensors cannot carry")
        if not texts:
            return np.zeros((0, self.max_length), np.int64)
        with self._lock:
            ids = self._request.infer([np.array(texts, dtype=np.str_)])[INPUT_IDS].astype(np.int64)  # [B, L]
        if ids.shape[1] > self.max_length:
            raise ValueError(f"tokenizer returned {ids.shape[1]} tokens, more than {self.max_length}")
        if ids.shape[1] < self.max_length:  # optimum's export pads to the longest prompt only
            if self.pad_token_id is None:
                raise ValueError("tokenizer model has no pad_token_id in its rt_info to pad to max_length")
            pad = np.full((len(texts), self.max_length - ids.shape[1]), self.pad_token_id, np.int64)
            ids = np.concatenate([ids, pad], axis=1)
        return ids  # [B, 77]
