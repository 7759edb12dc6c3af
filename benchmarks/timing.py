"""Our pipeline, timed stage by stage through the runtime's public API (one run, in a child of benchmarks.run).

The run: load; compile every model at the call's input shapes; prime with a 1-step call; time one full call;
the bound; last, compile times with the model cache (a fresh pipeline fills an empty cache, another reads it).
Where each figure comes from:
- load: the SDXLPipeline constructor. compile_*: OVModel.compile at each input shape set of the call, called
  on a fresh pipeline before its first call, so that no compile falls inside a call; the shapes come from
  `discover` (a 1-step call in a child of its own, once per harness run).
- tokenize: the pipeline's tokenizers, wrapped (runtime.tokenizer.Tokenizer does not time itself);
  text_encoder, text_encoder_2: their OVModel.call_seconds (request.infer).
- unet_*: the generation's step states, from the UNet's first call (seen by a `pipe.unet_observers` callable);
  the UNet's own call times (`gen.denoiser.call_seconds`) go to the detail record, and those of its full calls
  at the first call's shapes (DeepCache's shallow calls and the batch-1 calls after a guidance cut-off left out:
  the achieved GFLOP/s is counted at those shapes). vae_decode: `result()` after the loop (decode to uint8).
- the bound: the same compiled models called directly (OVModel.request), inputs set once, one untimed call,
  then timed calls: the text encoders on the token ids of the timed call, the UNet on the inputs of its first
  call (as many calls as the generation made), the VAE decoder on the final latents, one call per image as
  decode does (unscaled: a model's time does not depend on its input values). With DeepCache or a guidance
  cut-off (spec["strategy"], `benchmarks.run --deepcache-interval/--guidance-cutoff`) the UNet's calls differ in
  graph and batch: its bound is then the sum of its calls' own inference times, and the priming call is the
  whole measured call, so that the shallow model and the batch-1 UNet are compiled before it.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time

import numpy as np

from benchmarks.memory import peak_rss_self

now = time.perf_counter


def _kwargs(spec: dict, steps: int, strategy: bool = True) -> dict:
    """The call's arguments; strategy: with the run's DeepCache / guidance cut-off settings (benchmarks.run)."""
    return dict(prompt=spec["prompt"], height=spec["height"], width=spec["width"], num_inference_steps=steps,
                guidance_scale=spec["guidance_scale"], seed=0, output_type="np",
                **(spec.get("strategy") or {} if strategy else {}))  # fmt: skip


def _pipeline(spec: dict, cache_dir: str = ""):
    from runtime.pipeline import SDXLPipeline

    return SDXLPipeline(spec["model"], spec["device"], spec["precision"], cache_dir=cache_dir)


def _models(pipe) -> dict:
    """The pipeline's OVModels by name: text_encoder, text_encoder_2, unet, vae_decoder."""
    return {m.name: m for m in (*(enc.encoder for enc in pipe.text_encoders), pipe.unet, pipe.vae_decoder)}


class _TimedTokenizer:
    """A tokenizer that logs the seconds and the output (token ids) of each call."""

    def __init__(self, tokenizer, seconds: list[float], ids: list[np.ndarray]):
        self._tokenizer, self._seconds, self._ids = tokenizer, seconds, ids

    def __call__(self, texts):
        t = now()
        ids = self._tokenizer(texts)
        self._seconds.append(now() - t)
        self._ids.append(ids)
        return ids

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


class Probe:
    """What the harness sees of a pipeline's calls: the tokenizers' times and token ids, the time and inputs of
    the UNet's first call (an observer); each OVModel keeps its own call times."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.tokenize: list[float] = []
        self.token_ids: dict[str, list[np.ndarray]] = {}  # per text encoder, the ids of each call: [N, 77]
        self.first_unet_call: float | None = None
        self.unet_inputs: dict[str, np.ndarray] = {}
        self.gen = None  # set to a generation: then each of its full UNet calls' index and sample shape
        self.full_calls: list[tuple[int, tuple]] = []
        for enc in pipe.text_encoders:
            enc.tokenizer = _TimedTokenizer(
                enc.tokenizer, self.tokenize, self.token_ids.setdefault(enc.encoder.name, [])
            )
        pipe.unet_observers.append(self._observe)

    def _observe(self, inputs: dict[str, np.ndarray]) -> None:
        denoiser = getattr(self.gen, "denoiser", None)  # made when the generation starts
        if denoiser is not None:  # the observer runs just before the call's time is appended
            self.full_calls.append((len(denoiser.call_seconds), inputs["sample"].shape))
        if self.first_unet_call is None:
            self.first_unet_call = now()
            self.unet_inputs = {k: np.array(v) for k, v in inputs.items()}  # copies: the views change per step

    def reset(self) -> None:
        """Forget the calls so far."""
        self.tokenize.clear()
        for log in self.token_ids.values():
            log.clear()
        self.first_unet_call, self.unet_inputs = None, {}
        for model in _models(self.pipe).values():
            model.call_seconds.clear()

    def shapes(self, latents: np.ndarray) -> dict[str, list[dict]]:
        """Per model, the input shape sets of its calls (what OVModel.compile was asked for)."""
        out: dict[str, list[dict]] = {}
        for name, log in self.token_ids.items():
            out[name] = []
            for shape in ({"input_ids": list(ids.shape)} for ids in log):
                if shape not in out[name]:
                    out[name].append(shape)
        out["unet"] = [{k: list(v.shape) for k, v in self.unet_inputs.items()}]
        out["vae_decoder"] = [{"latent_sample": [1, *latents.shape[1:]]}]  # decode: one call per image
        return out


def compile_seconds(pipe, shapes: dict[str, list[dict]]) -> dict[str, float]:
    """Seconds in OVModel.compile per model, for each of its shape sets (compiles on a fresh pipeline)."""
    spent = {}
    for name, model in _models(pipe).items():
        t = now()
        for shape in shapes.get(name, []):
            model.compile(shape)
        spent[name] = now() - t
    return spent


def _infer_seconds(model, inputs: dict, calls: int = 1) -> float:
    """Inputs set once (copies owned by the tensors), one untimed call to settle, then `calls` timed calls."""
    import openvino as ov

    arrays = model.prepare(inputs)
    with model.request({k: v.shape for k, v in arrays.items()}) as request:
        for name, arr in arrays.items():
            request.set_tensor(name, ov.Tensor(arr))
        request.infer()
        total = 0.0
        for _ in range(calls):
            t = now()
            request.infer()
            total += now() - t
    return total


def discover(spec: dict) -> dict:
    """A 1-step call on a fresh pipeline -> the input shapes each model is called with at this size."""
    pipe = _pipeline(spec)
    probe = Probe(pipe)
    result = pipe(**_kwargs(spec, 1, strategy=False))  # the full UNet at the guided batch
    return {"shapes": probe.shapes(result.latents)}


def measure(spec: dict) -> dict:
    """One run of our pipeline -> {"stages": seconds by stage, "peak_rss_bytes", "detail"}."""
    shapes = spec["shapes"]
    st: dict[str, float | None] = {}
    t = now()
    pipe = _pipeline(spec)
    st["load"] = now() - t
    cold = compile_seconds(pipe, shapes)
    st["compile_cold"] = sum(cold.values())

    probe = Probe(pipe)
    # prime at the measured shapes: nothing is left to compile (DeepCache's shallow model and the cut-off's
    # batch-1 UNet too: the whole call, once)
    pipe(**_kwargs(spec, spec["steps"] if spec.get("strategy") else 1))
    probe.reset()
    marks = []
    t0 = now()
    gen = pipe.generate(**_kwargs(spec, spec["steps"]))
    probe.gen = gen
    for _ in gen:
        marks.append(now())
    loop_end = now()
    result = gen.result()
    end = now()
    encoders = [enc.encoder for enc in pipe.text_encoders]
    st["end_to_end"] = end - t0
    st["tokenize"] = sum(probe.tokenize)
    for enc in encoders:
        st[enc.name] = sum(enc.call_seconds)
    first = probe.first_unet_call
    steps = [marks[0] - first] + [b - a for a, b in zip(marks, marks[1:], strict=False)]
    st["unet_step_first"] = steps[0]
    st["unet_step_steady"] = statistics.median(steps[1:]) if len(steps) > 1 else None
    st["unet_loop"] = marks[-1] - first
    st["vae_decode"] = end - loop_end
    known = ("tokenize", *(enc.name for enc in encoders), "unet_loop", "vae_decode")
    st["other"] = st["end_to_end"] - sum(st[k] for k in known)
    unet_calls = list(gen.denoiser.call_seconds)
    first_shape = probe.full_calls[0][1] if probe.full_calls else None
    full = [unet_calls[i] for i, shape in probe.full_calls if shape == first_shape and i < len(unet_calls)]
    detail = {"compile_cold_per_model": cold, "unet_steps": steps, "unet_calls": unet_calls,
              "unet_full_calls": full, "strategy": spec.get("strategy") or {},
              "model_calls": {m.name: list(m.call_seconds) for m in (*encoders, pipe.vae_decoder)}}  # fmt: skip

    # The bound: the same compiled models, same static shapes and inputs, called directly.
    bound_enc = sum(_infer_seconds(m, {"input_ids": ids}) for m in encoders for ids in probe.token_ids[m.name])
    if spec.get("strategy"):  # calls of other graphs and batches: the bound is their own inference time
        bound_unet = sum(unet_calls)
    else:
        bound_unet = _infer_seconds(pipe.unet, probe.unet_inputs, calls=len(unet_calls))
    latents = result.latents
    bound_vae = sum(
        _infer_seconds(pipe.vae_decoder, {"latent_sample": latents[i : i + 1]}) for i in range(len(latents))
    )
    st.update(bound_text_encoders=bound_enc, bound_unet=bound_unet, bound_vae_decode=bound_vae,
              bound=bound_enc + bound_unet + bound_vae)  # fmt: skip
    rss = peak_rss_self()
    del pipe, gen, probe, result, encoders
    gc.collect()

    # Compile with the model cache: a fresh pipeline fills an empty cache dir, another one reads it.
    with tempfile.TemporaryDirectory(prefix="bench-ov-cache-") as cache:
        for label in ("compile_cache_fill", "compile_warm"):
            pipe = _pipeline(spec, cache)
            st[label] = sum(compile_seconds(pipe, shapes).values())
            del pipe
            gc.collect()
    return {"stages": st, "peak_rss_bytes": rss, "detail": detail}
