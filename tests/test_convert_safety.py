"""Convert never destroys data (issue 18), and refuses bad input before any heavy work.

- no input (source, --config, LoRA) inside OUTPUT and OUTPUT inside none: `S S --overwrite` deleted the source;
- one conversion per OUTPUT (a lock), and a final move that never replaces what it did not check: a folder that
  appears at OUTPUT while converting was deleted, and of two conversions to one OUTPUT the second replaced the first;
- a kill between the two renames of --overwrite left no OUTPUT: the swap is atomic (renameat2 RENAME_EXCHANGE) or
  recoverable, and the next run puts the old folder back and removes dead processes' leftovers;
- wrong tensor shapes of a single file or a LoRA, and a scheduler config with NaN or out-of-range values, are refused
  from the files' headers and the configs before anything is loaded (they took ~55 s of work to show); a LoRA whose
  fused weights are not finite is refused, naming the layer.

The final-move tests run convert_pipeline with its heavy stages (tokenizers, tracing, checks) replaced by fakes that
write placeholder IRs: what they test is what happens around and after those stages.
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from convert import safety
from convert.errors import ConvertError
from convert.lora import check_loras
from convert.pipeline import convert_pipeline
from convert.source import check_single_file, resolve
from runtime.leftovers import cleanup_stale
from tests import cli
from tests.cli import assert_one_line_error
from tests.models import ROOT, source_dir

# SDXL base's scheduler/scheduler_config.json
SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
             "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
             "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
             "use_karras_sigmas": False}  # fmt: skip
INDEX = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
         "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
         "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
         "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
         "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}  # fmt: skip
IRS = {"text_encoder": ["text_encoder"], "text_encoder_2": ["text_encoder_2"], "unet": ["unet"],
       "vae": ["vae_encoder", "vae_decoder"]}  # fmt: skip


def _fake_source(path: Path, **scheduler) -> Path:
    """A folder that resolve() accepts (placeholder weight files): enough where the checks come before any work."""
    for name in ("text_encoder", "text_encoder_2", "unet", "vae", "tokenizer", "tokenizer_2", "scheduler"):
        (path / name).mkdir(parents=True)
        (path / name / ("vocab.json" if name.startswith("tokenizer") else "model.safetensors")).write_text("{}")
    (path / "model_index.json").write_text(json.dumps(INDEX))
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER | scheduler))
    return path


def _tree(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones too) -> its content; links as `-> target`."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = f"-> {os.readlink(p)}"
            elif p.is_file():
                out[rel] = p.read_bytes().decode(errors="replace")
    return out


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def no_work(monkeypatch):
    """The heavy stages fail the test if they start: the check under test must come first."""
    from convert import component, tokenizers

    def fail(*args, **kwargs):
        raise AssertionError("the heavy work started before the check")

    monkeypatch.setattr(component, "run", fail)
    monkeypatch.setattr(tokenizers, "convert_tokenizer", fail)


class FakeWork:
    """Stands in for the tokenizers, tracing and checks: placeholder IRs tagged `tag`; `during` runs at the UNet."""

    def __init__(self):
        self.tag, self.during = "new", None

    def run(self, what, args, isolate, loader=None):
        if what == "check":
            return {"check_seconds": 0.0, "bytes": 1, "max_abs_diff": 0.0, "ref_max_abs": 1.0, "tolerance": 1.0,
                    "peak_rss": 0, "check_precision": "f32"}  # fmt: skip
        if args["name"] == "unet" and self.during is not None:
            self.during()
        out = {"peak_rss": 0}
        for ir in IRS[args["name"]]:
            (Path(args["tmp"]) / ir).mkdir()
            (Path(args["tmp"]) / ir / "openvino_model.xml").write_text(self.tag)
            out[ir] = {"params": 1, "seconds": 0.0}
        return out

    def tokenizer(self, src, dst):
        Path(dst).mkdir()
        (Path(dst) / "openvino_tokenizer.xml").write_text(self.tag)


@pytest.fixture
def fake_work(monkeypatch):
    from convert import component, tokenizers

    work = FakeWork()
    monkeypatch.setattr(component, "run", work.run)
    monkeypatch.setattr(tokenizers, "convert_tokenizer", work.tokenizer)
    monkeypatch.setattr(gc, "collect", lambda *a: 0)  # nothing to free after a fake stage; ~0.4 s each with torch
    return work


def _convert(src, out, **kwargs):
    return convert_pipeline(str(src), out, weight_format="fp32", isolate=False, log=lambda s: None, **kwargs)


def _main(capsys, *args) -> subprocess.CompletedProcess:
    """python -m convert in this process (its checks come after the heavy imports): exit code and output."""
    from convert.__main__ import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


# -- 1. inputs and OUTPUT never overlap ---------------------------------------------------------------------------
def test_output_never_overlaps_an_input(tmp_path):
    """Before: `S S --overwrite` replaced the source by the converted folder (exit 0); `S S/unet --overwrite` deleted
    the UNet's weights; a source, a single file or a --config folder inside OUTPUT went with --overwrite."""
    src = _fake_source(tmp_path / "S")
    parent = tmp_path / "P"
    _fake_source(parent / "S")
    (parent / "model.safetensors").write_text("{}")
    configs = _fake_source(tmp_path / "C")
    single = tmp_path / "model.safetensors"
    single.write_text("{}")
    (tmp_path / "lora-out").mkdir()
    (tmp_path / "lora-out" / "lora.safetensors").write_text("{}")
    (tmp_path / "link").symlink_to(src)
    before = _tree(tmp_path)
    cases = [
        ((src, src, "--overwrite"), f"{src} is the source {src}"),
        ((src, src / "unet", "--overwrite"), f"{src / 'unet'} is inside the source {src}"),
        ((src, src / "new-folder"), f"{src / 'new-folder'} is inside the source {src}"),
        ((parent / "S", parent, "--overwrite"), f"the source {parent / 'S'} is inside {parent}"),
        ((parent / "model.safetensors", parent, "--overwrite", "--config", configs),
         f"the source {parent / 'model.safetensors'} is inside {parent}"),
        ((single, configs, "--overwrite", "--config", configs), f"{configs} is the --config folder {configs}"),
        ((single, parent, "--overwrite", "--config", parent / "S"), f"the --config folder {parent / 'S'} is inside"),
        ((src, tmp_path / "lora-out", "--overwrite", "--lora", tmp_path / "lora-out" / "lora.safetensors:0.5"),
         "the LoRA"),
        ((src, tmp_path / "link", "--overwrite"), f"{tmp_path / 'link'} is the source {src}"),  # through a symlink
        ((src, single, "--overwrite"), f"{single} exists and is not a folder"),
    ]  # fmt: skip
    for args, needle in cases:
        assert_one_line_error(cli.run("convert", *args), needle)
    assert _tree(tmp_path) == before  # nothing changed, no lock or temporary folder left


# -- 2. one conversion per OUTPUT; the final move replaces nothing unchecked --------------------------------------
def test_second_conversion_to_one_output_fails_at_once(tmp_path, fake_work):
    """Before: both exited 0 and the one that ended last replaced the other's folder."""
    src, out = _fake_source(tmp_path / "S"), tmp_path / "out"
    second = []
    fake_work.tag = "first"
    fake_work.during = lambda: second.append(cli.run("convert", src, out, "--overwrite"))
    _convert(src, out)
    assert_one_line_error(second[0], f"{out} is being written by another conversion (process {os.getpid()})")
    assert (out / "unet" / "openvino_model.xml").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S", "out"]  # the lock file is gone with the conversion
    lock = safety.OutputLock(out)  # held as a running conversion holds it
    try:
        with pytest.raises(ConvertError, match="is being written by another conversion"):
            _convert(src, out, overwrite=True)
    finally:
        lock.release()
    assert (out / "unet" / "openvino_model.xml").read_text() == "first"


def test_lock_can_be_waited_for(tmp_path):
    """OutputLock(wait=True), for callers that share OUTPUT on purpose (test fixtures converting into one cache)."""
    import threading

    out = tmp_path / "out"
    first, got = safety.OutputLock(out), []
    waiter = threading.Thread(target=lambda: got.append(safety.OutputLock(out, wait=True)))
    waiter.start()
    waiter.join(0.5)
    assert not got  # blocked while the first holds it
    first.release()
    waiter.join(10)
    assert len(got) == 1 and (tmp_path / ".out.lock").read_text() == str(os.getpid())
    got[0].release()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "check-and-rename"])
@pytest.mark.parametrize("appears", ["folder", "empty-folder", "file"])
def test_output_appearing_while_converting_is_kept(tmp_path, fake_work, monkeypatch, renameat2, appears):
    """Before: exit 0 and what appeared at OUTPUT was deleted (os.rename also replaces an empty folder silently)."""
    if not renameat2:
        monkeypatch.setattr(safety, "_renameat2", lambda *a: False)
    src, out = _fake_source(tmp_path / "S"), tmp_path / "out"

    def appear():
        if appears == "file":
            out.write_text("theirs")
        else:
            out.mkdir()
            if appears == "folder":
                (out / "theirs.txt").write_text("theirs")

    fake_work.during = appear
    with pytest.raises(ConvertError, match=re.escape(f"{out} appeared while converting")):
        _convert(src, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S", "out"]
    if appears == "file":
        assert out.read_text() == "theirs"
    else:
        assert [p.name for p in out.iterdir()] == (["theirs.txt"] if appears == "folder" else [])
    fake_work.during = None  # --overwrite replaces a folder, leaving nothing beside it
    if appears == "file":
        with pytest.raises(ConvertError, match="exists and is not a folder"):
            _convert(src, out, overwrite=True)
        return
    _convert(src, out, overwrite=True)
    assert (out / "unet" / "openvino_model.xml").read_text() == "new" and not (out / "theirs.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S", "out"]


# -- 3. a kill while replacing OUTPUT is recovered; dead processes' leftovers are cleaned -------------------------
KILLED_SWAP = """
import os, signal, sys
from pathlib import Path
from convert import safety

out = Path(sys.argv[1])
tmp = out.parent / f".{out.name}.partial-{os.getpid()}"  # the finished conversion, as convert_pipeline leaves it
tmp.mkdir()
(tmp / "model.txt").write_text("new")
kill = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[2] == "fallback":  # no renameat2: killed between `OUTPUT -> .old-PID` and `.partial-PID -> OUTPUT`
    safety._renameat2 = lambda *a: False
    safety.between_renames = kill
else:  # RENAME_EXCHANGE: killed before the old folder (now at .partial-PID) is removed
    safety._remove = kill
safety.move_into_place(tmp, out, overwrite=True)
"""


def _killed_swap(out: Path, scheme: str) -> int:
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SWAP, str(out), scheme], cwd=ROOT, stderr=subprocess.PIPE)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()
    return proc.pid


def test_kill_while_replacing_output_is_recovered(tmp_path, no_work):
    """Before: a kill between the two renames left no OUTPUT (the old folder at .OUTPUT.old-PID, the new one at
    .OUTPUT.partial-PID), and later runs left both there for good."""
    src, out = _fake_source(tmp_path / "S"), tmp_path / "out"
    out.mkdir()
    (out / "model.txt").write_text("old")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for name in (f".out.partial-{live.pid}", f".out.old-{live.pid}", f".out.partial-{os.getpid()}.quantize"):
            (tmp_path / name).mkdir()  # a live conversion's: never touched
        (tmp_path / f".out.partial-{_dead_pid()}.quantize").mkdir()

        pid = _killed_swap(out, "fallback")
        assert not out.exists()  # the state a kill left before
        assert (tmp_path / f".out.old-{pid}" / "model.txt").read_text() == "old"
        assert (tmp_path / f".out.partial-{pid}" / "model.txt").read_text() == "new"
        log = []
        with pytest.raises(ConvertError, match="exists; pass --overwrite"):  # the old OUTPUT is back
            convert_pipeline(str(src), out, log=log.append)
        assert (out / "model.txt").read_text() == "old"
        assert any(line.startswith(f"restored {out} from .out.old-{pid}") for line in log), log

        pid = _killed_swap(out, "exchange")
        assert (out / "model.txt").read_text() == "new"  # the swap is atomic: OUTPUT is never missing
        assert (tmp_path / f".out.partial-{pid}" / "model.txt").read_text() == "old"
        with pytest.raises(ConvertError, match="exists; pass --overwrite"):
            convert_pipeline(str(src), out, log=log.append)
        assert (out / "model.txt").read_text() == "new"

        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["S", "out", f".out.partial-{live.pid}", f".out.old-{live.pid}", f".out.partial-{os.getpid()}.quantize"]
        )
    finally:
        live.kill()
        live.wait()


def test_cleanup_stale_runtime_outputs(tmp_path):
    """runtime.leftovers.cleanup_stale for the runtime's writers (`.NAME.partial-PID` files beside a PNG/npy)."""
    dead, live = _dead_pid(), os.getpid()
    (tmp_path / "x.png").write_text("png")
    for name in (f".x.png.partial-{dead}", f".x.png.partial-{live}", f".x.png.old-{dead}", f".y.png.partial-{dead}",
                 f".x.png.partial-{dead}x", "x.png.partial-1"):  # fmt: skip
        (tmp_path / name).write_text(name)
    done = cleanup_stale(tmp_path, "x.png")
    assert len(done) == 2 and all(line.startswith("removed") for line in done), done
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["x.png", f".x.png.partial-{live}", f".y.png.partial-{dead}", f".x.png.partial-{dead}x", "x.png.partial-1"]
    )
    assert (tmp_path / "x.png").read_text() == "png"


# -- 4. wrong shapes of a single file or a LoRA: from the headers, before any work --------------------------------
@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    """(the tiny base as one SGM-layout state dict, a --config folder without weights)."""
    import shutil

    from tests.single_file import checkpoint_from_folder

    src = source_dir("base")
    configs = tmp_path_factory.mktemp("configs") / "tiny-base-configs"
    shutil.copytree(src, configs, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return checkpoint_from_folder(src), configs


def test_single_file_shapes_are_checked_first(single_file, tmp_path, no_work, capsys):
    """Before: reported by diffusers after the tokenizers and loading the whole file (~49 s on this machine for the
    tiny model, ~55 s for SDXL), naming the diffusers key instead of the file's."""
    import torch
    from safetensors.torch import save_file

    state, configs = single_file
    up = "model.diffusion_model.output_blocks.2.2.conv.weight"
    qkv = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    assert list(state[up].shape) == [32, 32, 3, 3] and list(state[qkv].shape) == [192, 64]
    cases = {
        "unet": ({up: torch.zeros(32, 32, 1, 1)},
                 f"key '{up}' has shape [32, 32, 1, 1], expected [32, 32, 3, 3] (unet up_blocks.0.upsamplers.0.conv"),
        "qkv": ({qkv: torch.zeros(96, 64)},  # split into q, k, v by diffusers: k and v come out wrong
                f"key '{qkv}' of shape [96, 64] gives text_encoder_2 "
                "text_model.encoder.layers.0.self_attn.k_proj.weight the shape [32, 64], expected [64, 64]"),
        "missing": ({k: None for k in state if k.startswith("first_stage_model.decoder.mid.attn_1.")},
                    "vae weights are incomplete: 10 tensors missing from the file (first: decoder.mid_block"),
    }  # fmt: skip
    good = tmp_path / "good.safetensors"
    save_file(state, good)
    check_single_file(resolve(str(good), str(configs)))  # the sound file passes
    good.unlink()
    for case, (change, message) in cases.items():
        path = tmp_path / f"{case}.safetensors"
        save_file({k: v for k, v in (state | change).items() if v is not None}, path)
        with pytest.raises(ConvertError) as e:
            _convert(path, tmp_path / "out", config=str(configs))
        assert str(e.value).startswith(f"{path}: {message}"), str(e.value)
    assert_one_line_error(_main(capsys, tmp_path / "unet.safetensors", tmp_path / "out", "--config", configs),
                          f"key '{up}' has shape [32, 32, 1, 1], expected [32, 32, 3, 3]")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["missing.safetensors", "qkv.safetensors", "unet.safetensors"]


def _lora(path: Path, tensors: dict) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, path)
    return path


def test_lora_shapes_and_values_are_checked_first(tmp_path, no_work, capsys):
    """Before: a LoRA's shapes were checked when its component was traced (the UNet's after the tokenizers and both
    text encoders: 132 s on this machine), NaN tensors never."""
    import torch

    src = source_dir("base")  # the diffusers folder only: no conversion
    te2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    cases = {
        "unet": ({"unet.conv_in.lora_A.weight": torch.ones(2, 4, 1, 1),
                  "unet.conv_in.lora_B.weight": torch.ones(16, 2, 1, 1)},
                 "key 'unet.conv_in.lora_A.weight' does not match the UNet (down [2, 4, 1, 1], up [16, 2, 1, 1] for "
                 "module conv_in of weight [16, 4, 3, 3])"),
        "te2": ({f"{te2}.lora_down.weight": torch.ones(4, 32), f"{te2}.lora_up.weight": torch.ones(64, 4)},
                f"key '{te2}.lora_down.weight' does not match text_encoder_2 (down [4, 32], up [64, 4]"),
        "module": ({"unet.down_blocks.5.attentions.0.proj_in.lora_A.weight": torch.ones(4, 32),
                    "unet.down_blocks.5.attentions.0.proj_in.lora_B.weight": torch.ones(32, 4)},
                   "key 'unet.down_blocks.5.attentions.0.proj_in.lora_A.weight' does not match the UNet (no Linear"),
        "nan": ({"unet.conv_in.lora_A.weight": torch.ones(2, 4, 3, 3),
                 "unet.conv_in.lora_B.weight": torch.tensor(float("nan")).expand(16, 2, 1, 1).contiguous()},
                "key 'unet.conv_in.lora_B.weight' holds non-finite values (nan or inf)"),
    }  # fmt: skip
    good = {
        "unet.conv_in.lora_A.weight": torch.ones(2, 4, 3, 3),
        "unet.conv_in.lora_B.weight": torch.ones(16, 2, 1, 1),
        f"{te2}.lora_down.weight": torch.ones(4, 64),
        f"{te2}.lora_up.weight": torch.ones(64, 4),
    }
    check_loras([(_lora(tmp_path / "good.safetensors", good), 1.0)], source=resolve(str(src)))  # a sound LoRA passes
    (tmp_path / "good.safetensors").unlink()
    for case, (tensors, message) in cases.items():
        path = _lora(tmp_path / f"{case}.safetensors", tensors)
        with pytest.raises(ConvertError) as e:
            _convert(src, tmp_path / "out", loras=[(str(path), 1.0)])
        assert str(e.value).startswith(f"{path}: {message}"), str(e.value)
    proc = _main(capsys, src, tmp_path / "out", "--lora", f"{tmp_path / 'unet.safetensors'}:0.5")
    assert_one_line_error(proc, "key 'unet.conv_in.lora_A.weight' does not match the UNet")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_lora_fused_to_non_finite_weights_is_refused(tmp_path):
    """Before: fused silently; the UNet's conv_in was then inf."""
    import torch
    from diffusers import UNet2DConditionModel

    from convert.lora import apply_loras

    src = source_dir("base")  # the diffusers folder only: no conversion
    unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet")
    tensors = {"unet.conv_in.lora_A.weight": torch.full((2, 4, 3, 3), 1e20),
               "unet.conv_in.lora_B.weight": torch.full((16, 2, 1, 1), 1e20)}  # fmt: skip
    big = _lora(tmp_path / "big.safetensors", tensors)
    with pytest.raises(ConvertError, match=re.escape(f"{big}: fusing key 'unet.conv_in.lora_A.weight' (scale 1) makes "
                                                     "the UNet weight conv_in non-finite")):  # fmt: skip
        apply_loras("unet", unet, [(big, 1.0)])
    assert torch.isfinite(unet.conv_in.weight).all()


# -- 5. scheduler configs ------------------------------------------------------------------------------------------
BAD_SCHEDULERS = [
    ({"beta_start": float("nan")}, "beta_start is nan; expected a finite number above 0 and below 1"),
    ({"beta_start": float("inf")}, "beta_start is inf"),
    ({"beta_start": -0.001}, "beta_start is -0.001"),
    ({"beta_end": 0.0005}, "beta_end is 0.0005; expected a number above beta_start (0.00085)"),
    ({"beta_end": "0.012"}, "beta_end is '0.012'"),
    ({"num_train_timesteps": 500_000_000}, "num_train_timesteps is 500000000; expected a whole number from 1 to "
     "100000"),
    ({"num_train_timesteps": 0}, "num_train_timesteps is 0"),
    ({"num_train_timesteps": 1000.5}, "num_train_timesteps is 1000.5"),
    ({"num_train_timesteps": True}, "num_train_timesteps is True"),
    ({"steps_offset": -1}, "steps_offset is -1; expected a whole number from 0 to 999"),
    ({"trained_betas": [0.001, float("nan")]}, "trained_betas[1] is nan"),
    ({"sigma_min": 10.0, "sigma_max": 1.0}, "sigma_max is 1.0; expected a number above sigma_min (10.0)"),
]  # fmt: skip


@pytest.mark.parametrize("change, message", BAD_SCHEDULERS, ids=[str(c) for c, _ in BAD_SCHEDULERS])
def test_bad_scheduler_config_is_refused_first(tmp_path, no_work, change, message):
    """Before: converted (exit 0), writing e.g. `"beta_start": NaN` into the folder, whose every image is then NaN."""
    src = _fake_source(tmp_path / "S", **change)
    with pytest.raises(ConvertError) as e:
        _convert(src, tmp_path / "out")
    assert str(e.value).startswith(f"{src}: scheduler config: {message}"), str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S"]


def test_scheduler_checks(tmp_path, no_work, capsys):
    """Refused with --scheduler too, as one CLI error line; the check runs again on the swapped config, which passes
    for every scheduler made from a sound config."""
    from convert.pipeline import _swap_scheduler
    from convert.source import check_scheduler_config
    from schedulers import SCHEDULER_NAMES

    src = _fake_source(tmp_path / "S", beta_start=float("nan"))
    proc = _main(capsys, src, tmp_path / "out", "--scheduler", "lcm")
    assert_one_line_error(proc, f"{src}: scheduler config: beta_start is nan")
    for name in SCHEDULER_NAMES:
        check_scheduler_config(_swap_scheduler(dict(SCHEDULER), name), name)
    lcm = dict(_swap_scheduler(dict(SCHEDULER), "lcm"), original_inference_steps=0)
    with pytest.raises(ConvertError, match=re.escape("lcm: original_inference_steps is 0; expected a whole number")):
        check_scheduler_config(lcm, "lcm")
