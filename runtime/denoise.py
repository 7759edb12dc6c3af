"""The UNet denoiser: the one place where the UNet is called during a generation.

It owns the static-shape compile, an infer request of its own (so generations sharing a pipeline never share
buffers), the per-prompt inputs set once, the classifier-free-guidance call (one batch-2B call), guidance and
guidance rescale. Samplers call it as `model(x_in, t) -> output` in the UNet's prediction type; a strategy that
changes how the UNet is called (cached deep features, guidance stopped after a step, another batch) changes
this class, not the samplers or the generation. Two such strategies are here:
- DeepCache (runtime/deepcache.py): on the steps between full ones only the shallow branch of the UNet runs, on
  the feature the last full step kept (ref: DeepCache 0.1.1 DeepCacheSDHelper, sample_from_quad_center);
- guidance cut-off: after step int(steps * F) classifier-free guidance stops and the UNet runs at batch B on the
  conditional halves of the per-prompt inputs (ref: diffusers' "dynamic classifier-free guidance" recipe,
  callback_on_step_end at step_index == int(num_timesteps * F) setting _guidance_scale = 0).
# ref: diffusers StableDiffusionXLPipeline.__call__ (the denoising loop's model call and guidance)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import openvino as ov

from runtime import conditioning
from runtime.deepcache import derive, full_steps
from runtime.ov_model import _NP_TYPES, OVModel

CONDITIONING = ("encoder_hidden_states", "text_embeds", "time_ids", "timestep_cond")


@dataclass(frozen=True)
class DeepCache:
    """DeepCache's parameters (validated by runtime.params): interval N (1 = off), cache_branch_id, the schedule
    of full steps (uniform: every N-th; quadratic: sample_from_quad_center with center and pow)."""

    interval: int = 1
    branch: int = 0
    schedule: str = "uniform"
    center: float = 15
    pow: float = 1.4


class _Calls:
    """The UNet at one batch with its per-prompt inputs set once: the plain IR, or DeepCache's full (kept
    features as extra outputs) and shallow models, which share the features' buffers (the full request writes
    them, the shallow request reads them: no copy)."""

    def __init__(self, unet: OVModel, inputs: dict[str, np.ndarray], shapes: dict, dc: DeepCache | None):
        blank = {"sample": np.zeros(shapes["sample"], np.float32),
                 "timestep": np.zeros(shapes["timestep"], unet.input_types["timestep"])}  # fmt: skip
        self._inputs = unet.prepare({**inputs, **blank})
        self.shapes, self.tag = shapes, None if dc is None else f"deepcache-branch-{dc.branch}"
        self.features: dict[str, np.ndarray] = {}
        if dc is None:
            self.full, self.shallow = unet.compile(shapes).create_infer_request(), None
        else:
            surgery = partial(derive, branch=dc.branch)
            compiled = unet.compile_derived(shapes, self.tag, surgery)
            self.full = compiled["full"].create_infer_request()
            self.shallow = compiled["shallow"].create_infer_request()
            for port in compiled["full"].outputs:
                name = next((n for n in port.get_names() if n.startswith("deepcache_feature_")), None)
                if name is not None:
                    buf = np.zeros(port.get_partial_shape().to_shape(), _NP_TYPES.get(port.get_element_type()))
                    self.features[name] = buf
                    self.full.set_tensor(port, ov.Tensor(buf, shared_memory=True))
                    self.shallow.set_tensor(name, ov.Tensor(buf, shared_memory=True))
        # the requests read these buffers in place (shared memory): they live as long as this object
        for request in (self.full, self.shallow):
            if request is None:
                continue
            self._lora = unet.bind_lora(request)  # the active LoRA adapters' tensors, kept while this runs
            names = {n for p in request.model_inputs for n in p.get_names()}
            for k in inputs:  # set once; per step only sample and timestep change
                if k in names:
                    request.set_tensor(k, ov.Tensor(self._inputs[k], shared_memory=True))

    def infer(self, sample: np.ndarray, timestep: np.ndarray, full: bool = True) -> np.ndarray:
        request = self.full if full or self.shallow is None else self.shallow
        self._inputs["sample"] = sample  # kept alive while the request may read it
        request.set_tensor("sample", ov.Tensor(sample, shared_memory=True))
        request.set_tensor("timestep", ov.Tensor(timestep))
        request.infer()
        return request.get_tensor("out_sample").data


class UNetDenoiser:
    """model(x_in [B, C, h, w], t) -> the guided UNet output [B, C, h, w] for one generation.

    inputs: the per-prompt conditioning (encoder_hidden_states, text_embeds, time_ids; timestep_cond for a
    w-embedding UNet), already in the UNet's batch layout ([negative, positive] rows under guidance).
    timesteps: the generation's steps (plan.timesteps): a call's step index is its timestep's position there,
    as DeepCacheSDHelper finds it (DeepCache and the guidance cut-off need it; a call count otherwise)."""

    def __init__(
        self,
        unet: OVModel,
        inputs: dict[str, np.ndarray],
        sample_shape: tuple[int, ...],
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        do_cfg: bool = True,
        observers: Sequence[Callable[[dict[str, np.ndarray]], None]] = (),
        timesteps: Sequence[float] | np.ndarray | None = None,
        deepcache: DeepCache | None = None,
        guidance_cutoff: float | None = None,
        low_memory: bool = False,
    ):
        """observers: called before each full UNet call with all its inputs (read-only views; copy what you
        keep): quantization calibration records them. deepcache: DeepCache's parameters (None or interval 1:
        off). guidance_cutoff F: guidance stops after step int(len(timesteps) * F). low_memory: the batch-B UNet
        of the cut-off is compiled at the switch, after the batch-2B one is dropped (one compiled UNet at a time;
        otherwise both are compiled up front and stay cached)."""
        self.batch, self.do_cfg = sample_shape[0], do_cfg
        self.guidance_scale, self.guidance_rescale = np.float32(guidance_scale), float(guidance_rescale)
        self.unet_model, self.inputs, self.sample_shape = unet, dict(inputs), tuple(sample_shape)
        self.timestep_shape = tuple(d.get_length() if d.is_static else 1 for d in unet.input_shapes["timestep"])
        self.timestep_type = unet.input_types["timestep"]
        self.timesteps = None if timesteps is None else np.asarray(timesteps, np.float32)
        self.deepcache = deepcache if deepcache is not None and deepcache.interval > 1 else None
        n = 0 if self.timesteps is None else len(self.timesteps)
        # steps with index > cutoff_index run at batch B without guidance (the recipe's callback ends that step)
        self.cutoff_index = int(n * guidance_cutoff) if guidance_cutoff and do_cfg and n else None
        self.observers, self.low_memory = tuple(observers), low_memory
        self.call_seconds: list[float] = []  # each UNet call's inference time (benchmarks read it)
        self.shallow_calls = 0  # how many of them ran DeepCache's shallow branch
        self._calls_made = 0
        self._cut = False  # the guidance cut-off has happened
        self._start: int | None = None  # DeepCache: the index of the first step (DeepCacheSDHelper.start_timestep)
        self._full: set[int] | None = None  # DeepCache's full steps, counted from the first
        if self.deepcache is not None and self.timesteps is not None:  # a schedule that cannot be: fail now
            dc = self.deepcache
            self._full = full_steps(len(self.timesteps), dc.interval, dc.schedule, dc.center, dc.pow)
        self._hold = unet.in_use()  # no trim or release of the UNet while this generation runs on it
        self._hold.__enter__()
        self._batch_calls: dict[bool, _Calls] = {}  # guided (batch 2B, or B without CFG) / cut off (batch B)
        try:
            first = self._calls(guided=True)
            self._guided_shapes = (first.shapes, first.tag)
            if not low_memory and self.cutoff_index is not None and self.cutoff_index < n - 1:  # now, not later
                self._calls(guided=False)
        except BaseException:
            self._hold.__exit__(None, None, None)
            raise

    def _calls(self, guided: bool) -> _Calls:
        calls = self._batch_calls.get(guided)
        if calls is None:
            inputs = self.inputs
            if not guided:  # the conditional halves: what the recipe's callback keeps (chunk(2)[-1])
                inputs = {k: v[len(v) // 2 :] if k != "timestep_cond" else v for k, v in inputs.items()}
            m = 2 * self.batch if self.do_cfg and guided else self.batch
            shapes = {"sample": (m, *self.sample_shape[1:]), "timestep": self.timestep_shape}
            shapes |= {k: v.shape for k, v in inputs.items()}
            calls = self._batch_calls[guided] = _Calls(self.unet_model, inputs, shapes, self.deepcache)
        return calls

    def _index(self, t: float) -> int:
        if self.timesteps is not None:
            hits = np.flatnonzero(self.timesteps == np.float32(t))
            if len(hits):
                return int(hits[0])
        return self._calls_made

    def unet(self, sample: np.ndarray, t: float, guided: bool = True, full: bool = True) -> np.ndarray:
        """One UNet call on a batch in the UNet's layout; the output is a view valid until the next call."""
        calls = self._calls(guided)
        timestep = np.full(self.timestep_shape, t, dtype=self.timestep_type)
        if self.observers and full:
            for observe in self.observers:
                observe(calls._inputs | {"sample": sample, "timestep": timestep})
        t0 = time.perf_counter()
        out = calls.infer(sample, timestep, full)
        self.call_seconds.append(time.perf_counter() - t0)
        self.shallow_calls += not full
        return out

    def __call__(self, x_in: np.ndarray, t: float) -> np.ndarray:
        index = self._index(t)
        self._calls_made += 1
        full = True
        if self.deepcache is not None:
            dc = self.deepcache
            if self._start is None:
                self._start = index
                if self._start and self.timesteps is not None:  # a sampler that starts later: count from there
                    total = len(self.timesteps) - index
                    self._full = full_steps(total, dc.interval, dc.schedule, dc.center, dc.pow)
            step = index - self._start
            full = step in self._full if self._full is not None else step % dc.interval == 0
        x_in = np.ascontiguousarray(x_in, np.float32)
        if not self.do_cfg:
            return self.unet(x_in, t, full=full).copy()
        if self.cutoff_index is not None and index > self.cutoff_index:  # no guidance from here: batch B
            if not self._cut:  # DeepCache: the kept features' conditional halves carry on at batch B
                self._cut = True
                guided = self._calls(True)
                kept = {name: buf[len(buf) // 2 :].copy() for name, buf in guided.features.items()}
                if self.low_memory:  # one compiled UNet at a time
                    del self._batch_calls[True], guided
                    self.unet_model.forget(self._guided_shapes[0], self._guided_shapes[1])
                cut = self._calls(False)
                for name, half in kept.items():
                    cut.features[name][...] = half
            return self.unet(x_in, t, guided=False, full=full).copy()
        out = self.unet(np.concatenate([x_in, x_in]), t, full=full)
        uncond, text = out[: self.batch], out[self.batch :]
        guided = uncond + self.guidance_scale * (text - uncond)
        if self.guidance_rescale > 0:
            guided = conditioning.rescale_guidance(guided, text, self.guidance_rescale)
        return guided

    def close(self) -> None:
        """Drop the infer requests and the input buffers (the compiled models stay with their OVModel)."""
        if self._batch_calls is not None:
            self._batch_calls = None
            self._hold.__exit__(None, None, None)
