"""A compiled-model wrapper: named numpy inputs in, named numpy outputs back, static shapes, compile cache."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import openvino as ov

from runtime import model_cache
from runtime.errors import RuntimeInputError
from runtime.params import regular_file

_NP_TYPES = {
    ov.Type.f32: np.float32,
    ov.Type.f16: np.float16,
    ov.Type.i64: np.int64,
    ov.Type.i32: np.int32,
}


_MADV_DONTNEED = 4


def drop_mapped_pages(*paths: Path | str) -> int:
    """Drop this process's resident pages of the shared mappings of these files (or of the files under these
    folders) with madvise MADV_DONTNEED; returns the bytes of mapping advised (0 where /proc or madvise is
    unavailable).

    OpenVINO reads an IR's weights, and a model-cache blob, through a memory map that the compiled model keeps
    open, so every page read while compiling stays in the process's RSS next to the compiled model's own copies
    of the weights. A shared file mapping can drop its pages at any time: a page still read later comes back from
    the file's page cache (or the file) on first touch, unchanged; an unlinked file's mapping too (" (deleted)")."""
    if not sys.platform.startswith("linux"):
        return 0
    targets = [os.path.realpath(p) for p in paths if p]
    if not targets:
        return 0
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    total = 0
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[1] not in ("r--s", "rw-s"):  # shared file mappings: a page dropped stays in the
            continue  # file's page cache, dirty or not, and comes back from it
        name = parts[5].removesuffix(" (deleted)")  # a file unlinked once mapped (runtime.lora_fuse's)
        if any(name == t or name.startswith(t + os.sep) for t in targets):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if madvise(start, end - start, _MADV_DONTNEED) == 0:
                total += end - start
    return total


class _DropPagesWhile:
    """While the block runs (a compile), a thread drops the pages of `paths` read so far every `interval` s: the
    compiler reads each weight to make its own copy, so the map's pages need not stay until it returns. The
    interval bounds what is read between two drops, the peak's spread: a real-size SSD-1B fp16 UNet compiled
    (512x512, bf16) peaked at 3.03-3.22 GiB with 0.5 s, 2.76-2.78 GiB with 0.1 s and 2.74-2.75 GiB with 0.05 s,
    in 4.3-5.5 s each; SDXL's 5.28-5.30 GiB (0.5 s) against 5.17 GiB (0.1 s), 9.3-12.4 s; none: 9.9 GiB.
    A low-memory generation with the guidance cut-off compiles the UNet twice, so the spread showed as +9 % peak RSS
    over plain at 0.5 s (`python -m benchmarks.compile_memory`; RESULTS.md)."""

    def __init__(self, *paths: Path | str, interval: float = 0.1):
        self.paths, self.interval = paths, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            drop_mapped_pages(*self.paths)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        drop_mapped_pages(*self.paths)


def ov_error_reason(e: BaseException) -> str:
    """OpenVINO's message without its "Exception from file:line" and "Check '...' failed at" lines."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    kept = [ln for ln in lines if not ln.startswith(("Exception from ", "Check '"))]
    return " ".join(kept or lines[-1:]) or type(e).__name__


def read_ir(core: ov.Core, xml: Path) -> ov.Model:
    """core.read_model for an IR (.xml + .bin beside it), every failure as one RuntimeInputError naming the file.

    The files are checked first (regular files: a FIFO would hang; the xml starts like an IR: OpenVINO would
    otherwise try every frontend on it, some of which print parse errors to stderr)."""
    xml = Path(xml)
    weights = xml.with_suffix(".bin")
    for path in (xml, weights):
        regular_file(path, "submodel missing or incomplete")
    if weights.stat().st_size == 0:
        raise RuntimeInputError(f"{weights}: empty (the IR's weights are missing)")
    try:
        with open(xml, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise RuntimeInputError(f"{xml}: unreadable ({e.strerror or e})") from None
    if b"<net" not in head:
        raise RuntimeInputError(f"{xml}: not an OpenVINO IR (no <net> element at its start)")
    try:
        return core.read_model(xml)
    except RuntimeError as e:
        reason = ov_error_reason(e)
        if "weights" in reason.lower():  # "Incorrect weights in bin file!": a constant lies past its end
            raise RuntimeInputError(f"{weights}: does not hold the weights {xml.name} points to (truncated?)") from None
        if reason.startswith("Unable to read the model"):  # OpenVINO's frontends all declined it
            reason = "no OpenVINO frontend reads it"
        raise RuntimeInputError(f"{xml}: not a readable OpenVINO IR ({reason})") from None


DEFAULT_MAX_COMPILED = int(os.environ.get("SDXL_OPENVINO_MAX_COMPILED", "4"))


class OVModel:
    """One IR on one device. `compile(shapes)` reshapes to static shapes and compiles once per shape set.

    Thread-safe: the compiled models are shared, each caller runs on infer requests of its own (`__call__` takes
    an idle one from a pool, a generation's UNet denoiser creates its own), so concurrent calls never share input
    or output buffers. The CPU plugin runs the requests of one compiled model (one stream under the LATENCY hint)
    one at a time. At most `max_compiled` shape sets stay compiled, the least recently used is dropped first."""

    def __init__(
        self,
        core: ov.Core,
        xml: Path,
        device: str = "CPU",
        config: dict | None = None,
        max_compiled: int = DEFAULT_MAX_COMPILED,
        inputs: tuple[str, ...] = (),
        outputs: tuple[str, ...] = (),
    ):
        """inputs, outputs: names the IR must have for its role (the UNet's sample, timestep, ...): an IR of
        another submodel in this folder is refused here, in one line, not at its first call."""
        self.core, self.xml, self.device, self.config = core, Path(xml), device, dict(config or {})
        if max_compiled < 1:
            raise RuntimeInputError(f"max_compiled={max_compiled} must be at least 1")
        self.name = self.xml.parent.name
        self.max_compiled = max_compiled
        model = read_ir(core, self.xml)  # a missing, cut or foreign file: one line naming it
        for kind, ports, expected in (("inputs", model.inputs, inputs), ("outputs", model.outputs, outputs)):
            have = {name for p in ports for name in p.get_names()}
            missing = [n for n in expected if n not in have]
            if missing:
                found = sorted(p.get_any_name() for p in ports)
                listed = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
                raise RuntimeInputError(
                    f"{self.xml}: no {kind} {', '.join(missing)} (it has {listed or 'none'}): not the {self.name} IR"
                )
        self.input_names = [p.get_any_name() for p in model.inputs]
        self.output_names = [p.get_any_name() for p in model.outputs]
        self.input_types = {p.get_any_name(): _NP_TYPES.get(p.get_element_type(), np.float32) for p in model.inputs}
        self.input_shapes = {p.get_any_name(): p.get_partial_shape() for p in model.inputs}
        self._model: ov.Model | None = model
        self._compiled: OrderedDict[tuple, ov.CompiledModel] = OrderedDict()
        self._derived: dict[tuple, tuple[str, ...]] = {}  # (tag, shapes) -> the names compile_derived made
        self._idle: dict[tuple, list[ov.InferRequest]] = {}
        self._lock = threading.RLock()
        self._users = 0  # callers running on one of the compiled models: trim/release wait for none
        self.call_seconds: deque[float] = deque(maxlen=256)  # request.infer seconds of the last __call__s
        self.lora = None  # runtime.lora.ModelAdapters: while adapters are active, compiles add their LoRA branches

    @staticmethod
    def _key(shapes: dict[str, tuple[int, ...]]) -> tuple:
        return tuple(sorted((k, tuple(v)) for k, v in shapes.items()))

    def compile(self, shapes: dict[str, tuple[int, ...]]) -> ov.CompiledModel:
        """The compiled model for these static input shapes (reshape + compile on first use)."""
        if self._lora_tag() is not None:  # LoRA adapters loaded: the IR with their branches (runtime.lora)
            tag = self._lora_tag()
            compiled = self.compile_derived(shapes, "", lambda model: {"lora": model})["lora"]
            shape_key = self._key(shapes)
            with self._lock:  # one compiled copy of the weights: the plain model and older LoRA variants go
                for key in [k for k in self._compiled if k == shape_key or (
                        k[1:] == shape_key and "+lora-" in str(k[0]) and tag not in str(k[0]))]:  # fmt: skip
                    self._compiled.pop(key, None)
                    self._idle.pop(key, None)
            return compiled
        key = self._key(shapes)
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                return compiled
            model = self._model if self._model is not None else read_ir(self.core, self.xml)
            self._model = None  # reshape changes the model: read it again for the next shape set
            try:
                if shapes:
                    model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
                cache = self.config.get("CACHE_DIR", self.core.get_property("CACHE_DIR"))
                with _DropPagesWhile(self.xml.with_suffix(".bin"), cache):  # the compiled model holds what it needs
                    compiled = model_cache.compile_model(self.core, model, self.device, self.config)
                    del model
            except RuntimeError as e:  # a weight file changed or cut since it was read, a shape the graph refuses
                raise RuntimeInputError(f"{self.xml}: cannot compile on {self.device} ({ov_error_reason(e)})") from None
            self._compiled[key] = compiled
            while len(self._compiled) > self.max_compiled:
                old, _ = self._compiled.popitem(last=False)
                self._idle.pop(old, None)
            return compiled

    def compile_derived(
        self, shapes: dict[str, tuple[int, ...]], tag: str, derive: Callable[[ov.Model], dict[str, ov.Model]]
    ) -> dict[str, ov.CompiledModel]:
        """Models derived from this IR by graph surgery (DeepCache's), compiled once per (tag, shapes) and cached
        beside the plain ones (same LRU, trim and release). derive(model) gets the IR read once and reshaped to
        these static shapes and returns the models to compile by name; they may share its nodes and weights."""
        if self._lora_tag() is not None:  # LoRA adapters active: each derived model gets their branches
            tag, derive = tag + self._lora_tag(), self.lora.wrap(derive)
        shape_key = self._key(shapes)
        with self._lock:
            names = self._derived.get((tag, shape_key), ())
            keys = {name: (("~derived", tag, name), *shape_key) for name in names}
            if names and all(k in self._compiled for k in keys.values()):
                for k in keys.values():
                    self._compiled.move_to_end(k)
                return {name: self._compiled[k] for name, k in keys.items()}
            model = self._model if self._model is not None else read_ir(self.core, self.xml)
            self._model = None  # reshaped and changed: read it again for the next shape set
            try:
                if shapes:
                    model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
                models = derive(model)
                del model
                cache = self.config.get("CACHE_DIR", self.core.get_property("CACHE_DIR"))
                spilled = self.lora.spilled if self.lora is not None else ()  # fused LoRA weights, file-mapped
                with _DropPagesWhile(self.xml.with_suffix(".bin"), cache, *spilled):
                    compiled = {n: model_cache.compile_model(self.core, m, self.device, self.config)
                                for n, m in models.items()}  # fmt: skip
                    del models
            except RuntimeError as e:
                raise RuntimeInputError(f"{self.xml}: cannot compile on {self.device} ({ov_error_reason(e)})") from None
            self._derived[(tag, shape_key)] = tuple(compiled)
            for name, c in compiled.items():
                self._compiled[(("~derived", tag, name), *shape_key)] = c
            while len(self._compiled) > max(self.max_compiled, len(compiled)):
                old, _ = self._compiled.popitem(last=False)
                self._idle.pop(old, None)
            return compiled

    def forget(self, shapes: dict[str, tuple[int, ...]], tag: str | None = None) -> None:
        """Drop the compiled model(s) of these shapes (compile_derived's of `tag`) from the cache: their memory
        goes with the last infer request that still holds them (a low-memory generation that changes shape)."""
        if self._lora_tag() is not None:  # LoRA adapters active: their variant of these shapes (compile's)
            tag = (tag or "") + self._lora_tag()
        shape_key = self._key(shapes)
        with self._lock:
            names = self._derived.pop((tag, shape_key), ()) if tag is not None else ()
            keys = [(("~derived", tag, n), *shape_key) for n in names] if tag is not None else [shape_key]
            for key in keys:
                self._compiled.pop(key, None)
                self._idle.pop(key, None)

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Mark a caller running on this model's compiled models: trim() and release() leave them alone meanwhile
        (freeing a compiled model's memory while one of its requests runs is an error in OpenVINO)."""
        with self._lock:
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1

    @contextmanager
    def request(self, shapes: dict[str, tuple[int, ...]]) -> Iterator[ov.InferRequest]:
        """An infer request for these shapes that no other caller uses until the block ends."""
        lora = self._lora_tag()
        key = self._key(shapes) if lora is None else (("~derived", lora, "lora"), *self._key(shapes))
        with self.in_use():
            compiled = self.compile(shapes)
            with self._lock:
                pool = self._idle.get(key)
                request = pool.pop() if pool else compiled.create_infer_request()
            tensors = self.bind_lora(request)  # noqa: F841 -- kept alive while the request runs
            try:
                yield request
            finally:
                with self._lock:
                    if self._compiled.get(key) is compiled:  # not dropped or recompiled meanwhile
                        self._idle.setdefault(key, []).append(request)

    def _lora_tag(self) -> str | None:
        """The tag of the LoRA variant while adapters are active (runtime.lora), else None."""
        lora = self.lora
        return "+" + lora.tag if lora is not None and lora.active else None

    def bind_lora(self, request: ov.InferRequest) -> dict:
        """Set a request's LoRA inputs (if its model has them) to the active adapters' tensors; returns them (keep
        them while the request runs)."""
        return self.lora.bind(request) if self.lora is not None else {}

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once on full inputs; outputs are copies (safe to keep across calls)."""
        arrays = self.prepare(inputs)
        with self.request({k: v.shape for k, v in arrays.items()}) as request:
            t0 = time.perf_counter()
            request.infer(arrays)
            self.call_seconds.append(time.perf_counter() - t0)  # deque.append: atomic, no lock needed
            return {name: request.get_tensor(name).data.copy() for name in self.output_names}

    def prepare(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise RuntimeInputError(f"{self.name}: missing input(s) {', '.join(missing)}")
        out = {}
        for name in self.input_names:
            arr = np.ascontiguousarray(inputs[name], dtype=self.input_types[name])
            if not self.input_shapes[name].compatible(ov.PartialShape(list(arr.shape))):
                raise RuntimeInputError(
                    f"{self.name}: input {name} has shape {list(arr.shape)}, the model takes {self.input_shapes[name]}"
                )
            out[name] = arr
        return out

    def precision(self) -> str:
        """The precision this model runs in: its compile hint, else the device's default ("" if unknown)."""
        hint = self.config.get("INFERENCE_PRECISION_HINT")
        if hint:
            return str(hint)
        try:
            return self.core.get_property(self.device, "INFERENCE_PRECISION_HINT").get_type_name()
        except (RuntimeError, TypeError, AttributeError):
            return ""

    def trim(self) -> None:
        """Free the compiled models' intermediate buffers (activations), keep their weights and graphs: between
        stages, so that the UNet's and the VAE's activation memory do not add up. The next call allocates again."""
        with self._lock:
            if self._users:  # another generation is running on it: its buffers are in use
                return
            for compiled in self._compiled.values():
                compiled.release_memory()

    def release(self) -> None:
        """Drop the compiled models (their memory); the next call compiles again (fast with the model cache)."""
        with self._lock:
            if self._users:  # another generation is running on it: it stays compiled for them
                return
            self._idle.clear()
            self._compiled.clear()
            self._model = None
