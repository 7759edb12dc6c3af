"""SDXLPipeline's LoRA methods, with diffusers' names and semantics (ref: diffusers LoraBaseMixin /
StableDiffusionXLLoraLoaderMixin v0.42 with the peft backend, unfused adapters):
load_lora_weights(path, adapter_name) loads a file and makes it the one active adapter (weight 1);
set_adapters(names, adapter_weights) chooses the active set and weights; disable_lora()/enable_lora() turn all
adapters off/on without forgetting the set; unload_lora_weights() forgets them all; get_active_adapters();
fuse_lora(components, lora_scale) / unfuse_lora(components): the set in force baked into the weights (one compile
per set, steps at the cost of a LoRA fused at conversion; runtime/lora_fuse.py) or run as branches again.
The machinery (grafted branches, tensors switched without recompiling) is runtime/lora.py."""

from __future__ import annotations

import math
import threading
from pathlib import Path

from runtime.errors import RuntimeInputError
from runtime.lora import Float16RangeError, ModelAdapters
from runtime.lora_files import load_lora


def _weight(w, name: str) -> float:
    if w is None:
        return 1.0  # ref: diffusers set_adapters: a None weight is 1.0
    if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
        raise RuntimeInputError(f"adapter {name!r}: weight {w!r} is not a finite number (block-wise dicts are not "
                                "supported)")  # fmt: skip
    return float(w)


class LoraMixin:
    """LoRA adapters at run time for SDXLPipeline (its unet and text_encoders attributes)."""

    def _lora(self) -> dict:
        state = self.__dict__.get("_lora_state")
        if state is None:
            state = self.__dict__.setdefault("_lora_state", {"loaded": {}, "active": [], "enabled": True,
                                                              "lock": threading.RLock()})  # fmt: skip
        return state

    def _lora_models(self) -> dict:
        """component -> its OVModel, for the components this pipeline has."""
        models = {"unet": self.unet}
        encoders = [t.encoder for t in self.text_encoders]
        names = ["text_encoder_2"] if self.info.is_refiner else ["text_encoder", "text_encoder_2"]
        models.update(zip(names, encoders, strict=False))
        return models

    def load_lora_weights(self, path: str | Path, adapter_name: str | None = None) -> str:
        """Load a LoRA .safetensors file (diffusers/PEFT or kohya keys) as adapter `adapter_name` (diffusers'
        default_N if None) and make it the active adapter at weight 1; returns the name. Every layer is checked
        against the models first: a bad file changes nothing. Loading the same file again reads nothing."""
        state = self._lora()
        with state["lock"]:
            loaded = state["loaded"]
            name = adapter_name if adapter_name is not None else f"default_{len(loaded)}"
            if not isinstance(name, str) or not name:
                raise RuntimeInputError(f"adapter_name {adapter_name!r}: a non-empty string")
            if name in loaded:
                raise RuntimeInputError(f"adapter name {name!r} is already in use (unload_lora_weights() or another "
                                        "name)")  # fmt: skip
            lora = load_lora(path)
            models = self._lora_models()
            plans = {}
            for component in dict.fromkeys(layer.component for layer in lora.layers):
                if component not in models:
                    first = next(layer.key for layer in lora.layers if layer.component == component)
                    raise RuntimeInputError(f"{lora.path}: layer '{first}' is for {component}, which this pipeline "
                                            "does not have")  # fmt: skip
                model = models[component]
                if model.lora is None:
                    model.lora = ModelAdapters(model, component)
                plans[component] = model.lora.modules.plan(lora)
            loaded[name] = (lora, plans)
            for component, plan in plans.items():
                models[component].lora.register(plan)
            try:
                self._lora_activate([(name, 1.0)])
            except RuntimeInputError:
                del loaded[name]
                raise
            return name

    def set_adapters(self, adapter_names: str | list[str], adapter_weights=None) -> None:
        """The active adapters and their weights (a number for all, or one per adapter)."""
        state = self._lora()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        weights = adapter_weights if isinstance(adapter_weights, list | tuple) else [adapter_weights] * len(names)
        if len(weights) != len(names):
            raise RuntimeInputError(f"{len(weights)} adapter_weights for {len(names)} adapters")
        with state["lock"]:
            for name in names:
                if name not in state["loaded"]:
                    have = ", ".join(state["loaded"]) or "none"
                    raise RuntimeInputError(f"adapter {name!r} is not loaded (loaded: {have})")
            if len(set(names)) != len(names):
                raise RuntimeInputError(f"adapter names repeated: {names}")
            self._lora_activate([(n, _weight(w, n)) for n, w in zip(names, weights, strict=True)])

    def disable_lora(self) -> None:
        state = self._lora()
        with state["lock"]:
            state["enabled"] = False
            self._lora_apply()

    def enable_lora(self) -> None:
        state = self._lora()
        with state["lock"]:
            state["enabled"] = True
            self._lora_apply()

    def unload_lora_weights(self) -> None:
        """Forget every adapter; the plain models run again and the LoRA variants' compiled models are dropped."""
        state = self._lora()
        with state["lock"]:
            state["loaded"].clear()
            state["active"] = []
            self._lora_apply()
            for model in self._lora_models().values():
                if model.lora is not None:
                    with model._lock:
                        for key in [k for k in model._compiled if "+lora-" in str(k[0])]:
                            model._compiled.pop(key, None)
                            model._idle.pop(key, None)
                    model.lora = None

    def fuse_lora(self, components: list[str] | None = None, lora_scale: float = 1.0) -> None:
        """diffusers' fuse_lora: the adapters in force baked into the weights of `components` (default: all that
        have adapters) x lora_scale, so a step costs what a LoRA fused at conversion costs. The next generation
        compiles the fused models; so does each later change of the set (set_adapters, enable/disable, load), which
        stays fused until unfuse_lora(). Unlike diffusers, the set in force is what runs, fused or not, and
        unload_lora_weights() unfuses too (the fused weights are rebuilt from the adapters at each compile)."""
        state = self._lora()
        with state["lock"]:
            if isinstance(lora_scale, bool) or not isinstance(lora_scale, int | float) or not math.isfinite(lora_scale):
                raise RuntimeInputError(f"fuse_lora: lora_scale {lora_scale!r} is not a finite number")
            models = self._lora_components(components, "fuse_lora")
            if not state["loaded"]:
                raise RuntimeInputError("fuse_lora: no adapter is loaded (load_lora_weights() first)")
            for model in models.values():
                model.lora.check_fusable()
            for model in models.values():
                model.lora.fused = float(lora_scale)
            self._lora_apply()

    def unfuse_lora(self, components: list[str] | None = None) -> None:
        """The adapters of `components` (default: all) as branches again: switching them compiles nothing."""
        state = self._lora()
        with state["lock"]:
            for model in self._lora_components(components, "unfuse_lora").values():
                model.lora.fused = None
            self._lora_apply()

    def _lora_components(self, components, what: str) -> dict:
        models = {c: m for c, m in self._lora_models().items() if m.lora is not None}
        if components is None:
            return models
        names = [components] if isinstance(components, str) else list(components)
        for name in names:
            if name not in self._lora_models():
                have = ", ".join(self._lora_models())
                raise RuntimeInputError(f"{what}: component {name!r} is not one of this pipeline's ({have})")
        return {c: m for c, m in models.items() if c in names}

    def get_active_adapters(self) -> list[str]:
        return [name for name, _ in self._lora()["active"]]

    def get_list_adapters(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, (_, plans) in self._lora()["loaded"].items():
            for component, plan in plans.items():
                if plan:
                    out.setdefault(component, []).append(name)
        return out

    def lora_record(self) -> list[dict]:
        """The adapters in force (for the PNG metadata): file name (A1111's <lora:NAME:W>), weight, A1111 hash; and
        "fused": True while fuse_lora() is in force (bf16 rounds fused weights otherwise than branches)."""
        state = self._lora()
        if not state["enabled"]:
            return []
        fused = any(m.lora is not None and m.lora.fused is not None for m in self._lora_models().values())
        out = []
        for name, weight in state["active"]:
            lora = state["loaded"][name][0]
            out.append({"name": lora.name, "adapter": name, "weight": weight, "hash": lora.a1111_hash,
                        "path": str(lora.path), **({"fused": True} if fused else {})})  # fmt: skip
        return out

    def _lora_activate(self, active: list[tuple[str, float]]) -> None:
        """Make `active` the adapter set in force; a tensor float16 cannot hold (a model computing in bf16/f16) is
        one line naming the file and the layer, and the set in force stays: nothing half-set."""
        state = self._lora()
        before, state["active"] = state["active"], active
        try:
            self._lora_apply()
        except Float16RangeError as e:
            state["active"] = before
            self._lora_apply()
            path = next(lora.path for lora, _ in state["loaded"].values() if any(x is e.layer for x in lora.layers))
            raise RuntimeInputError(f"{path}: {e}") from None

    def _lora_apply(self) -> None:
        state = self._lora()
        active = state["active"] if state["enabled"] else []
        for component, model in self._lora_models().items():
            if model.lora is None:
                continue
            pairs = []
            for name, weight in active:
                plan = state["loaded"][name][1].get(component)
                if plan:
                    pairs.append((plan, weight))
            model.lora.set(pairs)


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """FILE[:WEIGHT] -> (file, weight); a suffix that is not a number stays part of the file name."""
    path, sep, tail = spec.rpartition(":")
    if sep and path and not tail.startswith(("/", "\\")):
        try:
            weight = float(tail)
        except ValueError:
            if not Path(spec).exists():
                raise RuntimeInputError(f"--lora {spec}: weight {tail!r} is not a number") from None
        else:
            if not math.isfinite(weight):
                raise RuntimeInputError(f"--lora {spec}: weight {tail!r} is not a finite number")
            return Path(path), weight
    return Path(spec), 1.0


def load_cli_loras(pipe, specs: list[str]) -> None:
    """--lora FILE[:WEIGHT] ...: each file loaded under its name (file stem, made unique), all active with their
    weights; every file is read and checked before the pipeline changes."""
    parsed = [parse_lora_spec(s) for s in specs]
    names: list[str] = []
    for path, _ in parsed:
        name, k = path.stem or "lora", 1
        while name in names:
            k += 1
            name = f"{path.stem}_{k}"
        names.append(name)
    files = [load_lora(path) for path, _ in parsed]  # a bad file: one line, before anything is loaded
    for (path, _), name in zip(parsed, names, strict=True):
        pipe.load_lora_weights(path, adapter_name=name)  # read once: `files` holds them
    del files
    pipe.set_adapters(names, adapter_weights=[w for _, w in parsed])
