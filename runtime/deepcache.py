"""DeepCache by OpenVINO graph surgery on the folder's own UNet IR: no second copy of its weights on disk.

DeepCache (Ma et al., CVPR 2024; reference: the `DeepCache` package 0.1.1, DeepCache/extension/deepcache.py
DeepCacheSDHelper) runs the full UNet every N steps and, on the steps between, only the shallow branch: every
module deeper than the cache position returns its output from the last full step. `cache_branch_id` B gives
cache_block_id b = B // 3 and cache_layer_id l = B % 3; on a shallow step DeepCacheSDHelper.is_skip_step caches
- the mid block, and every down block with index > b and up block with reversed index (n_up - 1 - i) > b;
- in down block b: the layers (resnet + attention) with index >= l and the downsampler (its layer index is the
  number of resnets), and the whole block when l == 0 (the block's own wrapper has layer index 0);
- in up block b (reversed): the layers with reversed index (n_layers - 1 - j) > l; never its upsampler.
What runs is the rest: the time embedding (with SDXL's add_embedding), conv_in, down blocks < b, down block b's
first l layers, up block b's last l + 1 layers, the up blocks after it, conv_norm_out, conv_out. Since down
layer k - 1 feeds up layer (reversed) k, everything a running layer reads comes from a running module, except
the hidden state entering up block b's first running layer: the one kept feature (for B = 0: the input of the
last up block's last resnet is cat(kept feature, conv_in's output)).

Here, from the read ov.Model (at static shapes):
- full: the model with the kept feature(s) added as extra output(s) (`add_outputs` on the node outputs a running
  node reads from a cached module);
- shallow: a clone where each kept feature enters as a Parameter and only what out_sample needs remains (the
  clone shares the weight Constants' buffers with the model it was cloned from).
The modules are found from the IR's friendly names (`<prefix>.up_blocks.N.resnets.M/aten::...`), which torch
tracing gives both our converter and optimum-cli; an IR without them is refused with one line naming why.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np
import openvino as ov

from runtime.errors import RuntimeInputError

SCHEDULES = ("uniform", "quadratic")
FEATURE = "deepcache_feature_{}"

_MODULE = re.compile(
    r"(?:^|\.)(?:(mid_block)|(down_blocks|up_blocks)\.(\d+)(?:\.(resnets|attentions|downsamplers|upsamplers)\.(\d+))?)"
    r"(?=[./]|$)"
)


def quad_center_steps(total: int, n_samples: int, center: float, pow: float) -> list[int]:
    """The full steps of DeepCache's non-uniform schedule: sample_from_quad_center(total, n, center, pow)[0] of
    DeepCache/sdxl/pipeline_stable_diffusion_xl.py, the same arithmetic (for center > 0 its linspace starts at a
    complex number, (-center) ** (1 / pow), whose real part it keeps when casting to int32)."""
    while pow > 1:
        x_values = np.linspace((-center) ** (1 / pow), (total - center) ** (1 / pow), n_samples + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
            ints = np.int32(x_values**pow)
        indices = [0] + [int(x + center) for x in np.unique(ints)[1:-1]]
        if len(indices) == n_samples:
            return indices
        pow -= 0.02
    raise RuntimeInputError(
        f"deepcache quadratic schedule: no exponent finds {n_samples} full steps in {total} with center {center} "
        "(DeepCache's sample_from_quad_center: lower --deepcache-center or the interval)"
    )


def full_steps(total: int, interval: int, schedule: str = "uniform", center: float = 15, pow: float = 1.4) -> set[int]:
    """Indices (0 = the generation's first step) of the steps that run the whole UNet.
    uniform: every `interval`-th step from the first (DeepCacheSDHelper); quadratic: DeepCache's SDXL pipeline
    (ceil(total / interval) full steps from sample_from_quad_center)."""
    if interval <= 1:
        return set(range(total))
    if schedule == "uniform":
        return set(range(0, total, interval))
    n = -(-total // interval)
    return set(quad_center_steps(total, n, center, pow))


def _module(name: str) -> tuple | None:
    """(kind, block, sub, layer) of the deepest UNet block module in a friendly name's module path, else None."""
    path = name.split("/", 1)[0]
    found = None
    for m in _MODULE.finditer(path):
        if m.group(1):
            found = ("mid_block", 0, None, None)
        else:
            layer = None if m.group(5) is None else int(m.group(5))
            found = (m.group(2), int(m.group(3)), m.group(4), layer)
    return found


@dataclass(frozen=True)
class _Layout:
    n_up: int
    down_resnets: dict[int, int]  # down block -> its number of resnets
    up_resnets: dict[int, int]  # up block (forward index) -> its number of resnets


def _layout(model: ov.Model) -> _Layout:
    down: dict[int, int] = {}
    up: dict[int, int] = {}
    for op in model.get_ops():
        mod = _module(op.get_friendly_name())
        if mod is None or mod[0] == "mid_block":
            continue
        kind, block, sub, layer = mod
        table = down if kind == "down_blocks" else up
        table.setdefault(block, 0)
        if sub == "resnets":
            table[block] = max(table[block], layer + 1)
    if not up or not all(up.get(i) for i in range(len(up))):
        raise RuntimeInputError(
            "DeepCache needs the UNet IR's module names (up_blocks.N.resnets.M in its node names, as torch tracing "
            "writes them); this IR has none"
        )
    return _Layout(len(up), down, up)


def _is_cached(mod: tuple | None, block: int, layer: int, layout: _Layout) -> bool:
    """DeepCacheSDHelper.is_skip_step on a shallow step, for the module a node belongs to."""
    if mod is None:
        return False
    kind, i, sub, j = mod
    if kind == "mid_block":
        return True
    if kind == "down_blocks":
        if i != block:
            return i > block
        if sub in ("resnets", "attentions"):
            return j >= layer
        if sub == "downsamplers":
            return layout.down_resnets.get(i, 0) >= layer
        return layer == 0  # the block's own wrapper (layer index 0)
    rev = layout.n_up - 1 - i
    if rev != block:
        return rev > block
    if sub in ("resnets", "attentions"):
        return layout.up_resnets[i] - 1 - j > layer
    return False  # the upsampler (layer index 0) and the block's own wrapper


def _free(model: ov.Model) -> set[str]:
    """Names of the nodes that do not depend on `sample`: weights and their decompression, the time and added
    embeddings, the text projections. A running module computes them afresh (the tracer may have merged equal
    ones of several modules into one node, named after the first: SiLU(temb) of every resnet), never a cut.
    The sample's shape is not its values (the time embedding is expanded to the sample's batch)."""
    free: set[str] = set()
    for op in model.get_ordered_ops():
        if op.get_type_name() == "ShapeOf":  # shapes are static here: not the sample's values
            free.add(op.get_name())
            continue
        is_sample = op.get_type_name() == "Parameter" and "sample" in op.output(0).get_names()
        if not is_sample and all(i.get_source_output().get_node().get_name() in free for i in op.inputs()):
            free.add(op.get_name())
    return free


def find_cuts(model: ov.Model, branch: int) -> list[tuple[ov.Node, int]]:
    """The (consumer node, input index) pairs where the shallow step reads a cached module's output."""
    layout = _layout(model)
    if not 0 <= branch < 3 * layout.n_up:
        raise RuntimeInputError(
            f"deepcache_branch={branch}: this UNet has {layout.n_up} up blocks, so 0..{3 * layout.n_up - 1}"
        )
    block, layer = divmod(branch, 3)
    free = _free(model)
    results = [r for r in model.get_results() if "out_sample" in r.input(0).get_source_output().get_names()]
    if len(results) != 1:
        raise RuntimeInputError("DeepCache: the UNet IR has no out_sample output")
    cuts, seen, stack = [], set(), [results[0]]
    while stack:
        node = stack.pop()
        for k, inp in enumerate(node.inputs()):
            src = inp.get_source_output().get_node()
            if src.get_name() in free:
                continue
            if _is_cached(_module(src.get_friendly_name()), block, layer, layout):
                cuts.append((node, k))
            elif src.get_name() not in seen:
                seen.add(src.get_name())
                stack.append(src)
    if not cuts:
        raise RuntimeInputError(f"DeepCache: branch {branch} caches nothing in this UNet IR (no module names found)")
    for node, k in cuts:
        out = node.input(k).get_source_output()
        if node.get_type_name() != "Concat" or out.get_partial_shape().rank.get_length() != 4:
            raise RuntimeInputError(
                f"DeepCache: the UNet IR's {node.get_friendly_name()} reads the cached "
                f"{out.get_node().get_friendly_name()} other than as a 4-D skip concatenation; cannot cut it there"
            )
    return cuts


def derive(model: ov.Model, branch: int) -> dict[str, ov.Model]:
    """{"full": the model with the kept features as extra outputs deepcache_feature_<k>, "shallow": the shallow
    branch with them as Parameters of the same names}. The model must have static shapes (reshaped)."""
    cuts = find_cuts(model, branch)
    sources: dict[tuple[str, int], int] = {}  # (node name, output index) -> feature k
    for node, k in cuts:
        out = node.input(k).get_source_output()
        sources.setdefault((out.get_node().get_friendly_name(), out.get_index()), len(sources))
    # shallow: a clone (sharing the Constants' buffers) with each cut input fed from a new Parameter
    shallow = model.clone()
    by_name = {op.get_friendly_name(): op for op in shallow.get_ops()}
    params: dict[int, ov.Node] = {}
    for node, k in cuts:
        out = node.input(k).get_source_output()
        f = sources[(out.get_node().get_friendly_name(), out.get_index())]
        if f not in params:
            p = ov.opset13.parameter(out.get_partial_shape(), out.get_element_type(), name=FEATURE.format(f))
            p.output(0).get_tensor().set_names({FEATURE.format(f)})
            params[f] = p
        by_name[node.get_friendly_name()].input(k).replace_source_output(params[f].output(0))
    result = next(r for r in shallow.get_results() if "out_sample" in r.input(0).get_source_output().get_names())
    needed = _ancestors(result)
    kept = [p for p in shallow.get_parameters() if p.get_name() in needed]
    shallow_model = ov.Model([result], kept + [params[f] for f in sorted(params)], "unet_deepcache_shallow")
    # full: the same model with the kept features as extra outputs
    ops = {op.get_friendly_name(): op for op in model.get_ops()}
    for (name, index), f in sorted(sources.items(), key=lambda s: s[1]):
        port = model.add_outputs([ops[name].output(index)])[0]
        port.get_tensor().add_names({FEATURE.format(f)})
    return {"full": model, "shallow": shallow_model}


def _ancestors(node: ov.Node) -> set[str]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for inp in n.inputs():
            src = inp.get_source_output().get_node()
            if src.get_name() not in seen:
                seen.add(src.get_name())
                stack.append(src)
    return seen
