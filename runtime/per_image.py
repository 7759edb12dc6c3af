"""seed_mode="per-image": a batch made as single-image generations, image i with seed + i (A1111's rule)."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from runtime.generation import Generation, GenerationResult, Refinement, StageCallback, _recorded
from runtime.params import GenerationParams
from schedulers import StepState

if TYPE_CHECKING:
    from runtime.pipeline import SDXLPipeline


def _pick(value, j: int):
    """Entry j of a per-prompt list parameter (a string or None applies to every prompt)."""
    return value[j] if isinstance(value, (list, tuple)) else value


class PerImage:
    """seed_mode="per-image": the batch as single-image generations (each a Generation, or a Refinement with a
    refiner), image i (prompt-major: prompt j's images are i = j*n .. j*n + n-1) with seed + i, so that each
    equals the one-image call with its own seed, bit for bit. Steps are numbered as one run."""

    def __init__(self, pipe: SDXLPipeline, params: GenerationParams):
        if params.seed is None:
            params = params.replace(seed=secrets.randbelow(2**63 - params.batch))
        self.params, self.pipe = params, pipe
        prompts = [params.prompt] if isinstance(params.prompt, str) else list(params.prompt)
        n, batch = params.num_images_per_prompt, params.batch
        image, latents = params.image, params.latents
        per_image = isinstance(image, np.ndarray) and image.ndim == 4 and len(image) == batch and batch > 1
        self.runs: list[Generation | Refinement] = []
        for i in range(batch):
            j = i // n
            one = dataclasses.replace(
                params, prompt=prompts[j], prompt_2=_pick(params.prompt_2, j),
                negative_prompt=_pick(params.negative_prompt, j), negative_prompt_2=_pick(params.negative_prompt_2, j),
                num_images_per_prompt=1, seed=params.seed + i,
                latents=None if latents is None else np.asarray(latents)[i : i + 1],
                image=image[i : i + 1] if per_image else image,
            )  # fmt: skip
            run = Refinement(pipe, pipe.refiner, one) if pipe.refiner is not None else Generation(pipe, one)
            self.runs.append(run)
        self._iter: Iterator | None = None

    @property
    def on_stage(self) -> StageCallback | None:
        return self.runs[0].on_stage

    @on_stage.setter
    def on_stage(self, callback: StageCallback | None) -> None:
        for run in self.runs:
            run.on_stage = callback

    @property
    def total(self) -> int:
        return sum(run.total for run in self.runs)

    def preview(self, state: StepState) -> np.ndarray | None:
        """Generation.preview, for any image's steps."""
        return self.runs[0].preview(state)

    def _steps(self) -> Iterator[StepState]:
        done, total = 0, self.total
        for run in self.runs:
            for state in run:
                yield dataclasses.replace(state, index=state.index + done, total=total)
            done += run.total

    def __iter__(self) -> Iterator[StepState]:
        if self._iter is None:
            self._iter = self._steps()
        return self._iter

    def result(self) -> GenerationResult:
        results = []
        for run in self.runs:  # each finishes (and decodes) before the next starts
            for _ in run:
                pass
            results.append(run.result())
        latents = np.concatenate([r.latents for r in results])
        refiner = self.pipe.refiner
        recorded = _recorded(self.pipe, self.params, latents[:1], refiner=refiner)
        recorded.latents = latents
        recorded.image_parameters = [r.image_parameters[0] for r in results]
        if self.params.output_type != "latent":
            recorded.images = np.concatenate([r.images for r in results])
        return recorded
