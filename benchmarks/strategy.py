"""The generation flags that make a UNet call cheaper or rarer (DeepCache, the guidance cut-off), as the
benchmarks take them: the same names as `python -m runtime.generate`, the GenerationParams fields underneath."""

from __future__ import annotations

import argparse

STRATEGY = ("deepcache_interval", "deepcache_branch", "deepcache_schedule", "deepcache_center", "deepcache_pow",
            "guidance_cutoff")  # fmt: skip


def add_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--deepcache-interval", type=int, help="DeepCache: the full UNet every N steps (1 = off)")
    p.add_argument("--deepcache-branch", type=int, help="DeepCache's cache_branch_id")
    p.add_argument("--deepcache-schedule", choices=("uniform", "quadratic"))
    p.add_argument("--deepcache-center", type=float)
    p.add_argument("--deepcache-pow", type=float)
    p.add_argument("--guidance-cutoff", type=float, help="guidance stops after this fraction of the steps")


def chosen(args: argparse.Namespace) -> dict:
    """The strategy flags given on the command line, by GenerationParams field."""
    return {k: getattr(args, k) for k in STRATEGY if getattr(args, k) is not None}
