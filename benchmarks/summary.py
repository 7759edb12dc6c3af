"""The harness's records -> the summary record, the markdown of table.md and the chart's bars (benchmarks.run)."""

from __future__ import annotations

import platform
from pathlib import Path

from benchmarks import report


def _medians(records: list[dict], arm: str) -> dict:
    """Median per stage of an arm's measured (not warm-up) runs; peak_rss in bytes, the rest in seconds."""
    by: dict[str, list] = {}
    for r in records:
        if r["kind"] == "measurement" and r["arm"] == arm and not r["warmup"]:
            by.setdefault(r["stage"], []).append(r.get("seconds", r.get("bytes")))
    return {k: report.median(v) for k, v in by.items()}


def _e2e_by_run(records: list[dict], arm: str) -> dict[int, float]:
    return {r["run"]: r["seconds"] for r in records if r["kind"] == "measurement" and r["arm"] == arm
            and not r["warmup"] and r["stage"] == "end_to_end"}  # fmt: skip


def summarize(records: list[dict], spec: dict, args, status: dict, failed: dict, cpu: dict):
    """-> (the summary record, the text of table.md, the chart's bars (label, seconds, group))."""
    import openvino as ov

    ours = _medians(records, "ours")
    rss = ours.pop("peak_rss")
    mine = _e2e_by_run(records, "ours")
    rows = [{"arm": "ours", "compile": ours["compile_cold"], "load": ours["load"], "end_to_end": ours["end_to_end"],
             "model_calls": ours["bound"], "peak_rss_bytes": rss, "best_end_to_end": min(mine.values())}]  # fmt: skip
    anchor_summary = {}
    for arm in status:
        if status[arm]:
            rows.append({"arm": arm, "status": f"skipped: {status[arm]}"})
        elif arm in failed:
            rows.append({"arm": arm, "status": f"failed: {failed[arm]}"})
        else:
            m = _medians(records, arm)
            theirs = _e2e_by_run(records, arm)
            # ours / theirs within each run (the two ran back to back): less exposed to the machine's drift
            paired = report.median([mine[r] / theirs[r] for r in theirs if r in mine])
            rows.append({"arm": arm, **m, "peak_rss_bytes": m.pop("peak_rss"), "paired_ours_to_it": paired,
                         "best_end_to_end": min(theirs.values())})  # fmt: skip
        anchor_summary[arm] = {k: v for k, v in rows[-1].items() if k != "arm"}
        if rows[-1].get("end_to_end"):
            anchor_summary[arm]["ratio_to_ours"] = rows[-1]["end_to_end"] / ours["end_to_end"]
    overhead = ours["end_to_end"] / ours["bound"]
    model = Path(spec["model"])
    summary = {
        "kind": "summary", "openvino": ov.get_version(), "python": platform.python_version(),
        "device": args.device, "precision": args.precision or "default", **cpu,
        "model": str(model), "model_bytes": sum(f.stat().st_size for f in model.rglob("*.bin")),
        "height": spec["height"], "width": spec["width"], "steps": args.steps,
        "guidance_scale": spec["guidance_scale"], "runs": args.runs, "warmup": args.warmup,
        "medians": ours, "peak_rss_bytes": rss, "bound": ours["bound"], "overhead_ratio": overhead,
        "images_per_s": 1 / ours["end_to_end"], "anchors": anchor_summary,
        "targets": report.target_rows(ours, rss, anchor_summary),
    }  # fmt: skip

    head = (f"model {model.name}, {spec['height']}x{spec['width']}, {args.steps} steps, precision "
            f"{summary['precision']}, {args.device}, OpenVINO {summary['openvino']}, {args.runs} run(s) after "
            f"{args.warmup} warm-up, CPU flags: {' '.join(summary['cpu_flags']) or 'none'}")  # fmt: skip
    bound_line = (f"bound (pure model calls) {ours['bound']:.4f} s, end to end {ours['end_to_end']:.4f} s, "
                  f"overhead ratio {overhead:.3f}; {summary['images_per_s']:.3f} images/s, "
                  f"peak RSS {rss / 2**20:.0f} MiB")  # fmt: skip
    text = "\n\n".join([head, report.stage_table(ours), bound_line, report.anchor_table(rows),
                         report.target_table(summary["targets"])]) + "\n"  # fmt: skip
    group = {k: "setup" for k in report.OUTSIDE} | {k: "bound" for k in report.BOUND}
    bars = [(k, ours[k], group.get(k, "ours")) for k in report.stage_order(ours)]
    bars += [(f"{r['arm']}: end_to_end", r.get("end_to_end"), "anchor") for r in rows[1:]]
    return summary, text, bars
