"""Find and load an SDXL-family checkpoint: a local diffusers folder, a single .safetensors file, or a hub id."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from convert.errors import ConvertError

SDXL_CLASSES = {
    "StableDiffusionXLPipeline": "base",
    "StableDiffusionXLImg2ImgPipeline": "refiner-or-base",
    "LatentConsistencyModelPipeline": "base",
}
NOT_SDXL = {
    "StableDiffusionPipeline": "Stable Diffusion 1.x/2.x",
    "StableDiffusionImg2ImgPipeline": "Stable Diffusion 1.x/2.x",
    "StableDiffusionInpaintPipeline": "Stable Diffusion 1.x/2.x",
    "StableDiffusionXLInpaintPipeline": "SDXL inpainting (9-channel UNet)",
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "FLUX",
}
COMPONENTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "vae", "scheduler")
MAX_TRAIN_TIMESTEPS = 100_000  # SDXL-family models train on 1000; a config far above is broken, not a model


@dataclass
class Source:
    kind: str  # "folder" | "single-file" | "hub"
    location: str
    model_index: dict
    components: list[str] = field(default_factory=list)  # the ones present (not null) in model_index
    config_dir: str | None = None  # single-file: diffusers configs to build the models from

    @property
    def is_refiner(self) -> bool:
        return "text_encoder" not in self.components


def _check_index(index: dict, where: str) -> list[str]:
    cls = index.get("_class_name")
    if cls in NOT_SDXL:
        raise ConvertError(f"{where} is a {NOT_SDXL[cls]} checkpoint ({cls}), not an SDXL-family one")
    if cls not in SDXL_CLASSES:
        raise ConvertError(f"{where}: unknown pipeline class {cls!r}; expected one of {', '.join(SDXL_CLASSES)}")
    present = _components(index)
    for needed in ("unet", "vae", "text_encoder_2", "tokenizer_2", "scheduler"):
        if needed not in present:
            raise ConvertError(f"{where}: model_index.json has no {needed}; not an SDXL-family pipeline")
    return present


def resolve(source: str, config: str | None = None, weights: bool = True) -> Source:
    """weights=False: a --config folder, which needs the configs and tokenizers only."""
    path = Path(source)
    if path.is_dir():
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise ConvertError(f"{source}: no model_index.json; not a diffusers pipeline folder")
        try:
            index = json.loads(index_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConvertError(f"{index_file}: unreadable ({e})") from None
        present = _check_index(index, source)
        for name in present:
            sub = path / name
            if not sub.is_dir() or not any(sub.iterdir()):
                raise ConvertError(f"{source}: {name}/ is missing or empty (model_index.json lists it)")
            if weights and name not in ("tokenizer", "tokenizer_2", "scheduler") and not _has_weights(sub):
                raise ConvertError(f"{source}: {name}/ has no weights file (partial download?)")
        return Source("folder", str(path), index, present)
    if path.suffix in (".safetensors", ".ckpt"):
        if not path.is_file():
            raise ConvertError(f"{source}: no such file")
        detected = _detect_single_file(path)
        if config is None:  # diffusers fetches the configs of the detected model type from the hub
            index = detected
        else:
            index = resolve(config, weights=False).model_index
            if ("text_encoder" in _components(index)) != ("text_encoder" in _components(detected)):
                raise ConvertError(f"{source} and --config {config} are not the same kind of SDXL model "
                                   "(one is a refiner)")  # fmt: skip
        present = _check_index(index, config or source)
        return Source("single-file", str(path), index, present, config_dir=config)
    if path.exists() or source.startswith((".", "/")) or source.count("/") != 1:
        raise ConvertError(f"{source}: not a diffusers folder, a .safetensors file or a hub id (org/name)")
    return _resolve_hub(source)


def _components(index: dict) -> list[str]:
    return [c for c in COMPONENTS if isinstance(index.get(c), list) and index[c][0] is not None]


def _detect_single_file(path: Path) -> dict:
    """A model_index for an original-layout (SGM/LDM) checkpoint, from its key names alone."""
    if path.suffix != ".safetensors":
        raise ConvertError(f"{path}: only .safetensors single files are read (pickled .ckpt files can run code)")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
    except Exception as e:
        raise ConvertError(f"{path}: not a readable .safetensors file ({type(e).__name__})") from None
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("cond_stage_model."):
        raise ConvertError(f"{path} is a Stable Diffusion 1.x/2.x checkpoint, not an SDXL-family one")
    if not has("model.diffusion_model.") or not has("first_stage_model."):
        raise ConvertError(f"{path}: not a Stable Diffusion checkpoint (no model.diffusion_model./first_stage_model.)")
    lib = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
           "scheduler": ["diffusers", "EulerDiscreteScheduler"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
           "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}  # fmt: skip
    if has("conditioner.embedders.1.model."):  # CLIP-L + OpenCLIP bigG: base
        lib |= {"tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder": ["transformers", "CLIPTextModel"]}
        return {"_class_name": "StableDiffusionXLPipeline", **lib}
    if has("conditioner.embedders.0.model."):  # OpenCLIP bigG alone: refiner
        return {"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
                "force_zeros_for_empty_prompt": False, **lib}  # fmt: skip
    raise ConvertError(f"{path}: no SDXL text encoders (conditioner.embedders.*) in the file")


def _has_weights(sub: Path) -> bool:
    return any(sub.glob("*.safetensors")) or any(sub.glob("*.bin")) or any(sub.glob("*.safetensors.index.json"))


def _resolve_hub(repo_id: str) -> Source:
    try:
        from huggingface_hub import hf_hub_download

        index = json.loads(Path(hf_hub_download(repo_id, "model_index.json")).read_text())
    except Exception as e:  # no network here; a user with internet gets the real thing
        raise ConvertError(f"{repo_id}: could not fetch model_index.json from the hub ({type(e).__name__})") from None
    return Source("hub", repo_id, index, _check_index(index, repo_id))


def check_scheduler_config(config: dict, where: str) -> None:
    """Refuse non-finite or out-of-range values of the scheduler config keys the runtime computes with, naming the
    key and its value (one bad number makes every generation NaN, or a schedule of 5e8 steps)."""

    def bad(key: str, expected: str, value=...):
        value = config[key] if value is ... else value
        raise ConvertError(f"{where}: {key} is {value!r}; expected {expected}")

    def number(key: str, low: float, high: float = math.inf) -> float | None:
        v = config.get(key)
        if v is None:
            return None
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and low < v < high
        if not ok:
            bad(key, f"a finite number above {low:g}" + (f" and below {high:g}" if high != math.inf else ""))
        return v

    def integer(key: str, low: int, high: int) -> int | None:
        v = config.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            bad(key, f"a whole number from {low} to {high}")
        return v

    steps = integer("num_train_timesteps", 1, MAX_TRAIN_TIMESTEPS) or 1000
    start, end = number("beta_start", 0.0, 1.0), number("beta_end", 0.0, 1.0)
    if start is not None and end is not None and end <= start:
        bad("beta_end", f"a number above beta_start ({start!r})")
    integer("steps_offset", 0, steps - 1)
    integer("original_inference_steps", 1, steps)  # LCM
    number("timestep_scaling", 0.0)  # LCM
    sigma_min, sigma_max = number("sigma_min", 0.0), number("sigma_max", 0.0)
    if sigma_min is not None and sigma_max is not None and sigma_max <= sigma_min:
        bad("sigma_max", f"a number above sigma_min ({sigma_min!r})")
    betas = config.get("trained_betas")
    if betas is not None:
        if not isinstance(betas, list) or not betas:
            bad("trained_betas", "a list of numbers")
        for i, b in enumerate(betas):
            if isinstance(b, bool) or not isinstance(b, int | float) or not (math.isfinite(b) and 0 < b < 1):
                bad(f"trained_betas[{i}]", "a finite number above 0 and below 1", b)


def model_class(name: str):
    """The diffusers/transformers class of a component with weights."""
    if name == "unet":
        from diffusers import UNet2DConditionModel as cls
    elif name == "vae":
        from diffusers import AutoencoderKL as cls
    elif name == "text_encoder":
        from transformers import CLIPTextModel as cls
    elif name == "text_encoder_2":
        from transformers import CLIPTextModelWithProjection as cls
    else:
        raise ValueError(name)
    return cls


def empty_model(source: Source, name: str):
    """Component `name` built from its config on torch's meta device (its modules and weight shapes, no memory, no
    weights read), or None for a single file whose configs diffusers fetches from the hub (no --config)."""
    import torch

    loc = source.config_dir if source.kind == "single-file" else source.location
    if loc is None:
        return None
    cls = model_class(name)
    try:
        if name.startswith("text_encoder"):
            config = cls.config_class.from_pretrained(loc, subfolder=name)
            with torch.device("meta"):
                return cls(config)
        config = cls.load_config(loc, subfolder=name)
        with torch.device("meta"):
            return cls.from_config(config)
    except (OSError, ValueError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConvertError(f"{loc}: cannot read the {name} config: {first}") from None


def _provenance_mode(origin: dict):
    """A torch function mode that maps id(tensor) -> the file key it was computed from (slices, transposes,
    clones of it), so that a converted tensor of the wrong shape can be traced back to the file's key."""
    import torch
    from torch.overrides import TorchFunctionMode

    class Provenance(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.origin, self.keep = dict(origin), []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and id(out) not in self.origin:
                for a in (*args, *(kwargs or {}).values()):
                    if isinstance(a, torch.Tensor) and id(a) in self.origin:
                        self.origin[id(out)] = self.origin[id(a)]
                        self.keep.append(out)  # alive, so that its id is not reused
                        break
            return out

    return Provenance()


def check_single_file(source: Source) -> None:
    """Every tensor of a single file has the shape its model expects, and none is missing: read from the file's
    header alone (no weights loaded), before any work. The file's keys go through diffusers' own SGM -> diffusers
    conversion as meta tensors, and are compared with the models the configs build on the meta device.
    Single files without --config (configs from the hub) are checked when loaded, as before."""
    if source.kind != "single-file" or source.config_dir is None:
        return
    import torch
    from diffusers.loaders import single_file_utils as sfu
    from safetensors import safe_open

    path = source.location
    with safe_open(path, framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    ckpt = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    clip_prefix = "conditioner.embedders.0.model." if source.is_refiner else "conditioner.embedders.1.model."
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        if name not in source.components:
            continue
        model = empty_model(source, name)
        try:
            with _provenance_mode({id(t): k for k, t in ckpt.items()}) as mode:
                if name == "unet":
                    converted = sfu.convert_ldm_unet_checkpoint(ckpt, dict(model.config))
                elif name == "vae":
                    converted = sfu.convert_ldm_vae_checkpoint(ckpt, dict(model.config))
                elif name == "text_encoder":
                    converted = sfu.convert_ldm_clip_checkpoint(ckpt)
                else:
                    converted = sfu.convert_open_clip_checkpoint(model, ckpt, prefix=clip_prefix)
        except Exception as e:  # what from_single_file would fail on, found early
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConvertError(f"{path}: cannot load as SDXL single file: {first}") from None
        if name.startswith("text_encoder") and not hasattr(model, "text_model"):  # as diffusers loads it
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        expected = model.state_dict()
        for key, tensor in converted.items():
            if key not in expected or list(tensor.shape) == list(expected[key].shape):
                continue
            want, got = list(expected[key].shape), list(tensor.shape)
            file_key = mode.origin.get(id(tensor))
            if file_key is None:
                raise ConvertError(f"{path}: {name} weight {key} has shape {got}, expected {want}")
            if ckpt[file_key] is tensor:  # renamed only
                raise ConvertError(f"{path}: key '{file_key}' has shape {shapes[file_key]}, expected {want} "
                                   f"({name} {key})")  # fmt: skip
            raise ConvertError(f"{path}: key '{file_key}' of shape {shapes[file_key]} gives {name} {key} the shape "
                               f"{got}, expected {want}")  # fmt: skip
        missing = [k for k, _ in model.named_parameters() if k not in converted]
        if missing:
            raise ConvertError(f"{path}: {name} weights are incomplete: {len(missing)} tensors missing from the "
                               f"file (first: {missing[0]})")  # fmt: skip


class Loader:
    """Loads one torch component at a time; single files are loaded once as a pipeline and handed out."""

    def __init__(self, source: Source, dtype):
        self.source, self.dtype, self._pipe = source, dtype, None

    def load(self, name: str):
        if self.source.kind == "single-file":
            return self._from_single_file(name)
        loc = self.source.location
        cls = model_class(name)
        try:
            model, info = cls.from_pretrained(loc, subfolder=name, dtype=self.dtype, output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConvertError(f"{loc}: cannot load {name}: {first}") from None
        missing = list(info.get("missing_keys", []))
        mismatched = list(info.get("mismatched_keys", []))
        if missing or mismatched:
            # Never convert a silently re-initialised model (e.g. CLIP keys saved without `text_model.`).
            bad = (missing or mismatched)[0]
            raise ConvertError(
                f"{loc}: {name} weights do not match its config: {len(missing)} missing, "
                f"{len(mismatched)} mismatched keys (first: {bad})"
            )
        return model.eval()

    def _from_single_file(self, name: str):
        model = getattr(self._load_pipe_for_configs(), name)
        setattr(self._pipe, name, None)  # the caller frees it after export
        # diffusers leaves the tensors that the file lacks on the meta device instead of failing
        missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if missing:
            raise ConvertError(f"{self.source.location}: {name} weights are incomplete: {len(missing)} tensors "
                               f"missing from the file (first: {missing[0]})")  # fmt: skip
        return model.eval()

    def _load_pipe_for_configs(self):
        if self._pipe is None:
            from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

            cls = StableDiffusionXLImg2ImgPipeline if self.source.is_refiner else StableDiffusionXLPipeline
            kwargs = {"torch_dtype": self.dtype}
            if self.source.config_dir:
                kwargs["config"] = self.source.config_dir
            try:
                self._pipe = cls.from_single_file(self.source.location, **kwargs)
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConvertError(f"{self.source.location}: cannot load as SDXL single file: {first}") from None
        return self._pipe

    def scheduler_config(self) -> dict:
        if self.source.kind == "single-file" and self._pipe is not None:
            return dict(self._pipe.scheduler.config)
        from diffusers import EulerDiscreteScheduler

        loc = self.source.config_dir if self.source.kind == "single-file" else self.source.location
        if loc is None:
            return dict(self._load_pipe_for_configs().scheduler.config)
        return dict(EulerDiscreteScheduler.load_config(loc, subfolder="scheduler"))

    def tokenizer_dir(self, name: str) -> Path:
        loc = self.source.config_dir if self.source.kind == "single-file" else self.source.location
        if loc is not None and Path(loc).is_dir():
            return Path(loc) / name
        if loc is None:  # single file with hub-fetched configs: save the pipeline's tokenizer
            import tempfile

            out = Path(tempfile.mkdtemp()) / name
            getattr(self._load_pipe_for_configs(), name).save_pretrained(out)
            return out
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(loc, allow_patterns=[f"{name}/*"])) / name
