"""LoRA adapters at run time: a LoRA branch grafted onto the compiled UNet / text encoders, switched by tensors.

Design (measured, see README "LoRA at run time" and the figures in the issue's report):
- No adapter loaded (or all unloaded): the plain compiled model runs, as before (nothing grafted, nothing set).
- The first generation after a load compiles each model once more from its IR with, for every layer a
  loaded adapter targets, a branch beside it, like openvino.genai's dynamic adapters (src/cpp/src/lora/adapter.cpp,
  which feeds A and B from ReadValue state variables): a Linear's MatMul output gets `+ (x @ A^T) @ B^T`, a
  Convolution's gets `+ conv1x1(conv(x, A), B)` (A with the layer's own kernel, strides and pads: LoCon). Here A
  and B are extra Parameters of the compiled model, `lora_a.N` [r, in(, kh, kw)] and `lora_b.N` [out, r(, 1, 1)]:
  an input tensor can share one numpy buffer between all infer requests (a state is copied into each request).
  A Linear's rank dimension is dynamic; a convolution's is static, the sum of its loaded adapters' ranks (the CPU
  plugin refuses a convolution with dynamic weight shapes), zero-padded for the adapters not active.
- A and B are fed in the type the model computes in, so that the graph converts nothing per call: bf16 (each file's
  tensors converted once and kept; a float16 Parameter converted in the graph was 1.8 % of a real-size UNet call's
  node time, its reference Convert kernel), float16 (a float16 file's tensors as stored: no copy) or float32 (exact
  to peft's float32 branch). Each rank column's scale (alpha / r x adapter weight) is a third input, lora_s.N,
  applied to x @ A^T ([tokens, r]: cheap), so a switch of weights copies no weight. A value float16 cannot hold is
  refused with one line (float16 models).
- Switching adapters (set_adapters, weights, disable/enable) only sets those inputs' tensors: several adapters
  are concatenated along the rank, each one's alpha/rank x adapter weight in its columns of the scale, so the
  branch is exactly peft's sum over active adapters of lora_B(lora_A(x)) * scaling (ref: peft
  tuners.lora.layer.Linear.forward / Conv2d.forward, unmerged). A grafted Linear layer no active adapter targets
  gets rank 0: empty A and B, whose MatMuls compute nothing. No recompilation: the tensors are shared (numpy
  buffers, no copy) by every infer request.
  Adapters disabled or none active: rank 0 on the same compiled model (x + 0: the plain model's output),
  whose plain compiled twin is dropped when it compiles: one compiled copy of the weights, not two.
- A file targeting a layer not grafted yet makes the next generation compile the model once more (the union of
  the loaded adapters' layers; LoRAs of a model family target the same layers, so in practice once).
- Weight-compressed folders (int8/int4) take adapters the same way: the branch reads the layer's input and adds
  to its output; the compressed weight is untouched.
fuse_lora() (runtime/lora_fuse.py) is the other trade: the set in force baked into the weight constants, one compile
per set, steps at a fused LoRA's cost.
Measured (benchmarks/lora_runtime.py --genai, the mid-size model, 512x512, bf16 hint, a rank-16 PEFT LoRA on the
attention and feed-forward layers, 2 CPU cores shared with other jobs, min of 3-4 interleaved rounds; two runs):
a UNet call 0.268 / 0.215 s plain, 0.284 / 0.228 s with the adapter, 0.250 / 0.299 s fused at conversion,
openvino.genai's run-time adapter 0.467 / 0.342 s on the same model and LoRA (0.229 / 0.215 s without);
set_adapters 3-4 ms against a 2-4 s cold UNet compile. Real-size random-weight SDXL base (512x512, bf16, rank 64
on the 700 attention/feed-forward layers; benchmarks/RESULTS.md): a UNet call 1.17-1.20x the same LoRA fused at
conversion (the branches: +5.8 % FLOPs at about a third of the layers' efficiency: MatMuls with a dimension of 64
run so even with A and B as constants, in a 12-layer test), 0.78x openvino.genai's run-time adapter;
set_adapters 0.1 s against a 14 s cold UNet compile; 0.98 GiB RSS per loaded adapter (A and B in float32; 0.28-0.34
GiB and a 0.014 s switch with float16 A and B and the scale as an input, RESULTS.md). With A and B in bf16 and GEGLU's
add after its split: the branches 8-9 % of a call's node time; calls 1.07-1.17x the same LoRA fused at conversion
measured in ways that cancel the up-to-9 % between two compiled copies of one graph, 1.02-1.04x the same branches
fed rank 0: their cost is mostly their passes over the layers' outputs, not their FLOPs (RESULTS.md).
On the mid-size model the first generation after the first load compiles the variant (5.5 s with the text
encoders and two steps).
The branch is added after the layer's bias Add, so that MatMul/Convolution + bias stay one fused op (measured 0.185 vs
0.207 s before it, noisy). GEGLU's projection (ff.net.0.proj, the widest output) is split in two right after it: its
branch is added to each half after the split (B's rows split alike), where the add joins GEGLU's element-wise subgraph
instead of a pass of its own over [tokens, 10240] (real-size SDXL, 512x512, per-node profile: the branches' share of a
UNet call's node time 10.0 % -> 8.9 %, the standalone adds 1.75 % -> 0.40 %). Static ranks for Linear layers too (the
sum of the loaded adapters' ranks) measured about the same as dynamic ones (0.358 vs 0.357 s, then 0.200 vs 0.206 s
against 0.191 s plain; at real size the branches' share of the node time 10.2 % static vs 9.7 % dynamic), so they stay
dynamic: no zero padding for loaded adapters that are not active, and loading a file whose layers are Linear ones
already grafted compiles nothing (a convolution's rank grows: one more compile; `ModelAdapters.static_linear` makes
Linear ranks static too).
The alternative, weights rebuilt per switch (W + B @ A, as at conversion), needs a recompile of the UNet at every
switch (constants are compiled in), which the run-time design exists to avoid.
Layers are found (runtime/lora_layers.py) by the module path in the IR's node names
(`__module.model.down_blocks.1...to_q/aten::linear`, as torch tracing writes them for our converter and optimum-cli).
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import openvino as ov

from runtime.errors import RuntimeInputError
from runtime.lora_files import Layer
from runtime.lora_layers import SHOWN, Modules


def _is_constant(output) -> bool:
    node = output.get_node()
    while node.get_type_name() in ("Convert", "Reshape", "Unsqueeze", "Squeeze"):
        node = node.input(0).get_source_output().get_node()
    return node.get_type_name() == "Constant"


def _after_bias(node: ov.Node) -> ov.Node:
    """The layer's bias Add (its one consumer, adding a constant), else the layer itself."""
    targets = list(node.output(0).get_target_inputs())
    if len(targets) == 1:
        add = targets[0].get_node()
        if add.get_type_name() == "Add" and add.get_output_size() == 1:
            other = add.input(1 - targets[0].get_index()).get_source_output()
            if _is_constant(other):
                return add
    return node


def _split_after(consumers) -> ov.Node | None:
    """A VariadicSplit of the layer's output into two along its last axis (GEGLU's ff.net.0.proj), else None."""
    for target in consumers:
        node = target.get_node()
        if node.get_type_name() == "VariadicSplit" and target.get_index() == 0 and node.get_output_size() == 2:
            axis = node.input(1).get_source_output().get_node()
            rank = node.get_input_partial_shape(0).rank.get_length()
            if axis.get_type_name() == "Constant" and int(axis.get_data().ravel()[0]) in (-1, rank - 1):
                return node
    return None


def graft(model: ov.Model, table: dict, modules: list[str], conv_rank: dict[str, int],
          dtype=np.float32) -> ov.Model:  # fmt: skip
    """Add a LoRA branch to each of `modules` (in place): Parameters lora_a.N / lora_b.N of `dtype` (BF16 or
    float16: converted to the layer's type in the graph, a conversion the plugin drops where it computes in that
    type) and lora_s.N [r] (each rank column's scale, float32), N = index in `modules`; the branch
    is ((x @ A^T) * s) @ B^T. A Linear's rank dimension is dynamic, a convolution's static (conv_rank: OpenVINO's
    CPU plugin refuses a convolution with a dynamic weight shape)."""
    ops = {op.get_friendly_name(): op for op in model.get_ops()}
    params = []
    for n, module in enumerate(modules):
        friendly, kind, shape = table[module]
        node = ops.get(friendly)
        if node is None:  # not in this (derived) model: DeepCache's shallow branch runs without it
            continue
        x = node.input(0).get_source_output()
        et = x.get_element_type()
        anchor = _after_bias(node)  # add after the bias: the layer's MatMul/Convolution + bias stay one fused op
        consumers = list(anchor.output(0).get_target_inputs())
        r = conv_rank.get(module, -1)  # -1: dynamic
        pt = ov.Type.bf16 if dtype == BF16 else ov.Type.f16 if dtype == np.float16 else et
        a = ov.opset13.parameter(ov.PartialShape([r, *shape[1:]]), pt, name=f"lora_a.{n}")
        b = ov.opset13.parameter(ov.PartialShape([shape[0], r, *[1] * (len(shape) - 2)]), pt, name=f"lora_b.{n}")
        scale = ov.opset13.parameter(ov.PartialShape([r]), et, name=f"lora_s.{n}")
        for p in (a, b, scale):
            p.output(0).get_tensor().set_names({p.get_friendly_name()})
        params += [a, b, scale]
        if pt != et:
            a, b = ov.opset13.convert(a, et), ov.opset13.convert(b, et)
        split = _split_after(consumers) if kind == "linear" else None
        if kind == "linear":
            down = ov.opset13.matmul(x, a, False, True, name=f"lora.{n}.down")
            down = ov.opset13.multiply(down, scale)
            if split is not None:  # GEGLU: each half's branch added after the split, inside GEGLU's subgraph
                lengths = split.input(2).get_source_output()  # GEGLU's halves: B's rows alike
                parts = ov.opset13.variadic_split(b, ov.opset13.constant(np.int64(0)), lengths)
                for i in range(2):
                    targets_i = list(split.output(i).get_target_inputs())
                    up = ov.opset13.matmul(down, parts.output(i), False, True, name=f"lora.{n}.up{i}")
                    added = ov.opset13.add(split.output(i), up, name=f"lora.{n}.add{i}")
                    for target in targets_i:
                        target.replace_source_output(added.output(0))
                continue
            branch = ov.opset13.matmul(down, b, False, True, name=f"lora.{n}.up")
        else:
            at = node.get_attributes()
            down = ov.opset13.convolution(x, a, at["strides"], at["pads_begin"], at["pads_end"], at["dilations"],
                                          at["auto_pad"])  # fmt: skip
            per_channel = ov.opset13.reshape(scale, ov.opset13.constant(np.array([1, -1, 1, 1], np.int64)), False)
            branch = ov.opset13.convolution(ov.opset13.multiply(down, per_channel), b, [1, 1], [0, 0], [0, 0], [1, 1])
        added = ov.opset13.add(anchor.output(0), branch, name=f"lora.{n}.add")
        for target in consumers:
            target.replace_source_output(added.output(0))
    model.add_parameters(params)
    model.validate_nodes_and_infer_types()
    return model


class Float16RangeError(RuntimeInputError):
    """An adapter's tensor, as fed to a model computing in bf16/f16, exceeds float16's range (names its layer)."""

    def __init__(self, layer: Layer, message: str):
        super().__init__(message)
        self.layer = layer


BF16 = "bf16"  # ModelAdapters.dtype of a model computing in bf16: A and B fed as bf16 (uint16 arrays of its bits)


def _storage(dtype) -> np.dtype:
    return np.dtype(np.uint16 if dtype == BF16 else dtype)


def as_bf16(arr: np.ndarray) -> np.ndarray:
    """float16/float32 -> bfloat16 bits (uint16), rounded to nearest even as OpenVINO's conversion does."""
    u = np.array(arr, np.float32, order="C").view(np.uint32)  # a copy, rounded in place
    u += ((u >> 16) & np.uint32(1)) + np.uint32(0x7FFF)
    u >>= 16
    return u.astype(np.uint16)


def _fed(layer: Layer, role: str, dtype) -> np.ndarray:
    """The layer's down or up weight as fed to a model computing in `dtype` (np.float32, np.float16 or BF16): as
    loaded when it is already (no copy), else converted once and kept on the layer; a type that cannot hold it is
    one line naming the layer, not inf."""
    arr = getattr(layer, role)
    if dtype != BF16 and arr.dtype == dtype:
        return arr
    key = (role, dtype if dtype == BF16 else np.dtype(dtype).str)
    if key not in layer.fed:
        if dtype == BF16:
            out = as_bf16(arr)
            finite = ((out & 0x7F80) != 0x7F80).all()  # rounded up to inf (files with nan/inf are refused on load)
        else:
            with np.errstate(over="ignore"):
                out = arr.astype(dtype)
            finite = np.isfinite(out).all()
        if not finite:
            kind = "bfloat16" if dtype == BF16 else "float16"
            raise Float16RangeError(layer, f"layer '{layer.key}' exceeds {kind}'s range (the adapters' tensors at "
                                           "this precision): use precision f32")  # fmt: skip
        layer.fed[key] = out
    return layer.fed[key]


class ModelAdapters:
    """One OVModel's LoRA state: the grafted layers and the tensors of the active adapter set."""

    static_linear = False  # Linear layers with a static rank too (measured: see the module's docstring)

    def __init__(self, ov_model, component: str):
        self.ov_model, self.component = ov_model, component
        # the branch's A and B in the type the model computes in: bf16 (no conversion per call in the graph),
        # float16 (a float16 file's tensors fed as stored), float32 (exact to peft's float32 branch)
        precision = ov_model.precision()
        self.dtype = BF16 if precision == "bf16" else np.float16 if precision == "f16" else np.float32
        self._modules: Modules | None = None
        self.grafted: list[str] = []  # the layers of the compiled LoRA variant, in parameter order
        self.conv_rank: dict[str, int] = {}  # a grafted convolution's rank: the sum of its loaded adapters' ranks
        self.tensors: dict[str, np.ndarray] = {}  # lora_a.N / lora_b.N of the active set
        self.active = False
        self.fused: float | None = None  # fuse_lora()'s lora_scale while the active set is fused into the weights
        self._fusion: tuple[str, dict] = ("", {})  # (tag, module -> [(layer, scale)]) of the active set, fused
        self.spilled: list[str] = []  # files of the fused weights (unlinked, mapped), runtime.lora_fuse
        self.lock = threading.Lock()

    @property
    def modules(self) -> Modules:
        if self._modules is None:
            from runtime.ov_model import read_ir

            self._modules = Modules(self.component, read_ir(self.ov_model.core, self.ov_model.xml))
        return self._modules

    @property
    def tag(self) -> str:
        if self.fused is not None:
            return self._fusion[0]
        layout = [f"{m}:{self.conv_rank.get(m, 0)}" for m in self.grafted]
        digest = hashlib.sha256("\n".join(layout).encode()).hexdigest()[:12]
        return f"lora-{digest}"

    def graft(self, model: ov.Model) -> ov.Model:
        return graft(model, self.modules.table, list(self.grafted), dict(self.conv_rank), self.dtype)

    def wrap(self, derive):
        if self.fused is not None:  # runtime.lora_fuse: the active set baked into the weight constants
            from runtime.lora_fuse import fuse

            terms, spill = self._fusion[1], self.spill_dir()
            self.spilled = []  # the files of this compile's fused weights (runtime.ov_model drops their pages)
            return lambda model: {name: fuse(m, self.modules.table, terms, spill, self.spilled)
                                  for name, m in derive(model).items()}  # fmt: skip
        return lambda model: {name: self.graft(m) for name, m in derive(model).items()}

    def spill_dir(self) -> str:
        """Where fused weights are written to be file-mapped: the model cache folder if one is set, else the
        system's temporary folder."""
        import tempfile

        cache = self.ov_model.config.get("CACHE_DIR") or self.ov_model.core.get_property("CACHE_DIR")
        return cache or tempfile.gettempdir()

    def check_fusable(self) -> None:
        """fuse_lora(): one line if a grafted layer's weight is compressed (nothing to fuse into)."""
        from runtime.lora_fuse import check_fusable
        from runtime.ov_model import read_ir

        check_fusable(read_ir(self.ov_model.core, self.ov_model.xml), self.modules.table, self.grafted,
                      SHOWN[self.component])  # fmt: skip

    def register(self, plan: dict[str, Layer]) -> None:
        """A loaded adapter's layers: grafted from the next compile on (convolutions: their rank added)."""
        with self.lock:
            known = set(self.grafted)
            self.grafted += [m for m in sorted(plan) if m not in known]
            for module, layer in plan.items():
                if self.modules.table[module][1] == "conv" or self.static_linear:
                    self.conv_rank[module] = self.conv_rank.get(module, 0) + layer.rank

    def set(self, pairs: list[tuple[dict[str, Layer], float]]) -> None:
        """The active set: (plan, adapter weight) per adapter; empty: zero tensors (the branches add nothing)."""
        wanted = sorted({m for plan, _ in pairs for m in plan})
        with self.lock:
            missing = [m for m in wanted if m not in set(self.grafted)]
            if missing:
                raise RuntimeError(f"LoRA layers set before registered: {missing[:3]}")
            tensors = {}
            for n, module in enumerate(self.grafted):
                downs, ups, scales = [], [], []
                for plan, weight in pairs:
                    layer = plan.get(module)
                    if layer is not None:  # peft: lora_B(lora_A(x)) * scaling, scaling = alpha / r * weight
                        downs.append(_fed(layer, "down", self.dtype))
                        ups.append(_fed(layer, "up", self.dtype))
                        scales.append(np.full(layer.rank, layer.scaling * weight, np.float32))
                shape = self.modules.table[module][2]
                # a dynamic-rank layer no active adapter targets: rank 0 (empty A and B: the branch's MatMuls have
                # nothing to compute, its add adds zeros); a static one: zeros to its rank
                if module in self.conv_rank:
                    pad = self.conv_rank[module] - sum(map(len, downs))
                else:
                    pad = 0
                store = _storage(self.dtype)
                if pad or not downs:
                    downs.append(np.zeros((pad, *shape[1:]), store))  # zero bits: +0.0 in every type
                    ups.append(np.zeros((shape[0], pad, *[1] * (len(shape) - 2)), store))
                    scales.append(np.zeros(pad, np.float32))
                # one adapter: its tensors as loaded, no copy (a switch of weights sets only the scales)
                down = downs[0] if len(downs) == 1 else np.concatenate(downs, axis=0)
                up = ups[0] if len(ups) == 1 else np.concatenate(ups, axis=1)
                tensors[f"lora_a.{n}"] = np.ascontiguousarray(down, store)
                tensors[f"lora_b.{n}"] = np.ascontiguousarray(up, store)
                tensors[f"lora_s.{n}"] = np.concatenate(scales)
            self.tensors, self.active = tensors, bool(self.grafted)
            if self.fused is not None:  # the fused variant of this set, its own tag (none active: the plain weights)
                terms: dict[str, list] = {}
                for plan, weight in pairs:
                    for module, layer in plan.items():
                        terms.setdefault(module, []).append((layer, layer.scaling * weight * self.fused))
                key = "\n".join(f"{m}:{id(x)}:{s!r}" for m in sorted(terms) for x, s in terms[m])
                self._fusion = (f"lora-fused-{hashlib.sha256(key.encode()).hexdigest()[:12]}", terms)

    def bind(self, request: ov.InferRequest) -> dict[str, np.ndarray]:
        """Point the request's LoRA inputs at the active set's tensors (shared memory: no copy); returns them
        (the caller keeps them while it runs the request: a switch meanwhile makes new ones)."""
        tensors = self.tensors
        if self.fused is not None:
            return {}  # the fused variant has no LoRA inputs
        for port in request.model_inputs:
            name = port.get_any_name()
            if name.startswith("lora_"):
                arr = tensors[name]
                if self.dtype == BF16 and not name.startswith("lora_s."):
                    tensor = ov.Tensor(arr, list(arr.shape), ov.Type.bf16)  # shares arr's memory
                else:
                    tensor = ov.Tensor(arr, shared_memory=True)
                request.set_tensor(port, tensor)
        return tensors
