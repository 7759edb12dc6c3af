"""Prompts -> CLIP input_ids [B, 77] with an OpenVINO tokenizer model (ours, or optimum-intel's export).

ref: diffusers StableDiffusionXLPipeline.encode_prompt:
    tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
Our openvino_tokenizer.xml (convert/tokenizers.py) pads and truncates to 77 itself and gives transformers' ids.
optimum-intel's has the same interface but pads to the longest prompt and has truncation switched off (a state
variable); both are set here. It keeps openvino-tokenizers' known differences from transformers (an added token
typed in the prompt, tokenizer_2's "!", rare Unicode): convert/tokenizers.py lists them.
"""

import threading
from pathlib import Path

import numpy as np
import openvino as ov
import openvino_tokenizers

INPUT_IDS = "input_ids"
TRUNCATION_STATE = "truncation"  # openvino_tokenizers TruncationStep.TRUNCATE_ENABLED_VAR_ID


class Tokenizer:
    def __init__(self, core: ov.Core, xml_path: Path, max_length: int = 77):
        xml_path = Path(xml_path)
        if not xml_path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {xml_path}")
        core.add_extension(str(openvino_tokenizers._ext_path))  # the tokenizer ops, for a Core made before import
        model = core.read_model(xml_path)
        if len(model.inputs) != 1 or model.input(0).get_element_type() != ov.Type.string:
            raise ValueError(f"{xml_path}: expected one string input, got {model.inputs}")
        if not any(INPUT_IDS in o.names for o in model.outputs):
            raise ValueError(f"{xml_path}: no '{INPUT_IDS}' output in {[o.names for o in model.outputs]}")
        self.max_length = max_length
        self.pad_token_id = (
            int(model.get_rt_info("pad_token_id").astype(int)) if model.has_rt_info("pad_token_id") else None
        )
        self._request = core.compile_model(model, "CPU").create_infer_request()
        self._lock = threading.Lock()  # one request (it holds the truncation state): callers take turns
        for state in self._request.query_state():
            if state.name == TRUNCATION_STATE:
                state.state = ov.Tensor(np.array(True))

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
