"""Benchmark output: medians, the markdown tables and the PNG bar chart (drawn with PIL, no matplotlib)."""

from __future__ import annotations

import statistics
from pathlib import Path

# Stages of our pipeline, in table order. `inside` ones are parts of the end-to-end call (share column).
OUTSIDE = ["load", "compile_cold", "compile_cache_fill", "compile_warm"]
INSIDE_HEAD = ["tokenize"]  # then one row per text encoder (their names come from the model folder)
INSIDE_TAIL = ["unet_step_first", "unet_step_steady", "unet_loop", "vae_decode", "other"]
BOUND = ["bound_text_encoders", "bound_unet", "bound_vae_decode", "bound"]


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _s(v: float | None, digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def stage_order(medians: dict[str, float | None]) -> list[str]:
    encoders = sorted(k for k in medians if k.startswith("text_encoder"))
    names = [*OUTSIDE, *INSIDE_HEAD, *encoders, *INSIDE_TAIL, "end_to_end", *BOUND]
    return [n for n in names if n in medians]


def stage_table(medians: dict[str, float | None]) -> str:
    """stage | median s | share of end-to-end (only for the parts of the end-to-end call)."""
    e2e = medians.get("end_to_end")
    lines = ["| stage | median s | share of end-to-end |", "|---|---:|---:|"]
    outside = set(OUTSIDE) | set(BOUND)
    for name in stage_order(medians):
        v = medians[name]
        if name in ("unet_step_first", "unet_step_steady") or name in outside or not e2e or v is None:
            share = "—"  # per-step rows are parts of unet_loop; load/compile/bound are outside the call
        else:
            share = f"{100 * v / e2e:.1f} %"
        lines.append(f"| {name} | {_s(v)} | {share} |")
    return "\n".join(lines)


def anchor_table(rows: list[dict]) -> str:
    """One row per pipeline: ours first, then the anchors (measured, failed or skipped). Model calls: ours is the
    bound; genai's come from its performance metrics, optimum-intel's from timing its compiled models' calls."""
    lines = [
        "| pipeline | load s | compile s | end-to-end s | best run s | e2e ratio to ours | model calls s "
        "| e2e / model calls | peak RSS MiB | images/s | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    ours = next((r.get("end_to_end") for r in rows if r["arm"] == "ours"), None)
    for r in rows:
        e2e, calls = r.get("end_to_end"), r.get("model_calls")
        ratio = f"{e2e / ours:.2f}" if e2e and ours else "—"
        overhead = f"{e2e / calls:.3f}" if e2e and calls else "—"
        rss = f"{r['peak_rss_bytes'] / 2**20:.0f}" if r.get("peak_rss_bytes") else "—"
        ips = f"{1 / e2e:.3f}" if e2e else "—"
        lines.append(
            f"| {r['arm']} | {_s(r.get('load'), 3)} | {_s(r.get('compile'), 3)} | {_s(e2e)} "
            f"| {_s(r.get('best_end_to_end'))} | {ratio} | {_s(calls)} | {overhead} | {rss} | {ips} "
            f"| {r.get('status', 'ok')} |"
        )
    return "\n".join(lines)


def draw_chart(path: Path, bars: list[tuple[str, float, str]], title: str) -> None:
    """Horizontal bars (label, seconds, group). Groups 'setup' (load, compile), 'ours', 'bound', 'anchor' get their
    own colours; the setup bars have their own scale (they would flatten the others), marked by a gap."""
    from PIL import Image, ImageDraw, ImageFont

    bars = [(label, v, g) for label, v, g in bars if v is not None]
    font = ImageFont.load_default()
    row, left, right, top, gap = 22, 190, 130, 34, 14
    n_setup = sum(1 for b in bars if b[2] == "setup")
    width, height = 900, top + row * max(1, len(bars)) + (gap if n_setup else 0) + 16
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), title, fill="black", font=font)
    scale = {
        True: max((v for _, v, g in bars if g == "setup"), default=1.0) or 1.0,
        False: max((v for _, v, g in bars if g != "setup"), default=1.0) or 1.0,
    }
    span = width - left - right
    colours = {"setup": (117, 80, 123), "ours": (52, 101, 164), "bound": (115, 210, 22), "anchor": (204, 0, 0)}
    y = top
    for i, (label, v, group) in enumerate(bars):
        if i == n_setup and n_setup:
            y += gap
            d.line([(10, y - gap // 2), (width - 10, y - gap // 2)], fill=(200, 200, 200))
        d.text((10, y + 4), label[:30], fill="black", font=font)
        w = max(1, round(span * v / scale[group == "setup"]))
        d.rectangle([left, y + 3, left + w, y + row - 3], fill=colours.get(group, (100, 100, 100)))
        d.text((left + w + 6, y + 4), f"{v:.4g} s", fill="black", font=font)
        y += row
    img.save(path)


def target_rows(ours: dict, rss: int, anchors: dict) -> list[dict]:
    """The issue's targets, each with the measured value: overhead ratio, end to end against genai (static) and
    optimum-intel, peak RSS against genai, and a warm start (model cache present) against a cold one."""
    rows = [{"target": "overhead ratio (end to end / bound)", "limit": 1.02,
             "value": ours["end_to_end"] / ours["bound"] if ours.get("bound") else None}]  # fmt: skip
    for arm, limit in (("genai-static", 1.02), ("optimum-static", 0.92), ("optimum", 0.92)):
        e2e = anchors.get(arm, {}).get("end_to_end")
        value = ours["end_to_end"] / e2e if e2e else None
        rows.append({"target": f"end to end / {arm}", "limit": limit, "value": value,
                     "paired": anchors.get(arm, {}).get("paired_ours_to_it")})  # fmt: skip
    for arm in ("genai-static", "genai"):
        other = anchors.get(arm, {}).get("peak_rss_bytes")
        rows.append({"target": f"peak RSS / {arm}", "limit": 1.0, "value": rss / other if other else None})
    cold = (ours.get("load") or 0) + (ours.get("compile_cold") or 0)
    warm = (ours.get("load") or 0) + (ours.get("compile_warm") or 0)
    rows.append({"target": "warm start / cold start (load + compile)", "limit": 0.5,
                 "value": warm / cold if cold and ours.get("compile_warm") is not None else None})  # fmt: skip
    for r in rows:
        r["met"] = None if r["value"] is None else r["value"] <= r["limit"]
    return rows


def target_table(rows: list[dict]) -> str:
    """measured: ratio of the medians (what `met` judges); paired: median of the per-run ratios."""
    lines = ["| target | measured | paired | limit | met |", "|---|---:|---:|---:|---|"]
    for r in rows:
        met = "—" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['target']} | {_s(r['value'], 3)} | {_s(r.get('paired'), 3)} | <= {r['limit']} | {met} |")
    return "\n".join(lines)
