"""The UNet denoiser: the one place where the UNet is called during a generation.

It owns the static-shape compile, an infer request of its own (so generations sharing a pipeline never share
buffers), the per-prompt inputs set once, the classifier-free-guidance call (one batch-2B call), guidance and
guidance rescale. Samplers call it as `model(x_in, t) -> output` in the UNet's prediction type; a strategy that
changes how the UNet is called (cached deep features, guidance stopped after a step, another batch) changes
this class, not the samplers or the generation.
# ref: diffusers StableDiffusionXLPipeline.__call__ (the denoising loop's model call and guidance)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import openvino as ov

from runtime import conditioning
from runtime.ov_model import OVModel

CONDITIONING = ("encoder_hidden_states", "text_embeds", "time_ids", "timestep_cond")


class UNetDenoiser:
    """model(x_in [B, C, h, w], t) -> the guided UNet output [B, C, h, w] for one generation.

    inputs: the per-prompt conditioning (encoder_hidden_states, text_embeds, time_ids; timestep_cond for a
    w-embedding UNet), already in the UNet's batch layout ([negative, positive] rows under guidance)."""

    def __init__(
        self,
        unet: OVModel,
        inputs: dict[str, np.ndarray],
        sample_shape: tuple[int, ...],
        guidance_scale: float,
        guidance_rescale: float = 0.0,
        do_cfg: bool = True,
        observers: Sequence[Callable[[dict[str, np.ndarray]], None]] = (),
    ):
        """observers: called before each UNet call with all its inputs (read-only views; copy what you keep):
        quantization calibration records them."""
        self.batch, self.do_cfg = sample_shape[0], do_cfg
        self.guidance_scale, self.guidance_rescale = np.float32(guidance_scale), float(guidance_rescale)
        m = 2 * self.batch if do_cfg else self.batch
        self.timestep_shape = tuple(d.get_length() if d.is_static else 1 for d in unet.input_shapes["timestep"])
        self.timestep_type = unet.input_types["timestep"]
        shapes = {"sample": (m, *sample_shape[1:]), "timestep": self.timestep_shape}
        shapes |= {k: v.shape for k, v in inputs.items()}
        self.observers = tuple(observers)
        self.call_seconds: list[float] = []  # each UNet call's inference time (benchmarks read it)
        self._request = unet.compile(shapes).create_infer_request()
        self._hold = unet.in_use()  # no trim or release of the UNet while this generation runs on it
        self._hold.__enter__()
        # the request reads these buffers in place (shared memory): they live as long as this object
        self._inputs = unet.prepare({**inputs, "sample": np.zeros(shapes["sample"], np.float32),
                                     "timestep": np.zeros(self.timestep_shape, np.float32)})  # fmt: skip
        for k in inputs:  # set once; per step only sample and timestep change
            self._request.set_tensor(k, ov.Tensor(self._inputs[k], shared_memory=True))

    def unet(self, sample: np.ndarray, t: float) -> np.ndarray:
        """One UNet call on a batch in the UNet's layout; the output is a view valid until the next call."""
        self._inputs["sample"] = sample  # kept alive while the request may read it
        self._request.set_tensor("sample", ov.Tensor(sample, shared_memory=True))
        self._request.set_tensor("timestep", ov.Tensor(np.full(self.timestep_shape, t, dtype=self.timestep_type)))
        if self.observers:
            for observe in self.observers:
                observe(self._inputs | {"timestep": self._request.get_tensor("timestep").data})
        t0 = time.perf_counter()
        self._request.infer()
        self.call_seconds.append(time.perf_counter() - t0)
        return self._request.get_tensor("out_sample").data

    def __call__(self, x_in: np.ndarray, t: float) -> np.ndarray:
        if not self.do_cfg:
            return self.unet(np.ascontiguousarray(x_in, np.float32), t).copy()
        out = self.unet(np.concatenate([x_in, x_in]).astype(np.float32, copy=False), t)
        uncond, text = out[: self.batch], out[self.batch :]
        guided = uncond + self.guidance_scale * (text - uncond)
        if self.guidance_rescale > 0:
            guided = conditioning.rescale_guidance(guided, text, self.guidance_rescale)
        return guided

    def close(self) -> None:
        """Drop the infer request and the input buffers (the compiled UNet stays with its OVModel)."""
        if self._request is not None:
            self._request = None
            self._inputs = {}
            self._hold.__exit__(None, None, None)
