"""Peak host memory of ``lowrank bench accuracy`` with one cell against six, each in a fresh process.

A grid that deep-copied the model per cell held two models at its peak; compressing the one loaded model
in place (:class:`lowrank_kit.snapshot.ModelSnapshot`) holds one. Runs ``svd`` cells (no calibration) on
the real SmolLM2-135M (fp32, 0.54 GB: the testbed's 3 MB would drown in the process's own memory) with
a short perplexity evaluation, and reports each run's peak resident memory.

    python benchmarks/grid_memory.py --output benchmarks/results/grid_memory/grid_memory.json
    python benchmarks/grid_memory.py --tree /tmp/oldtree --output old.json   # another checkout, same runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import resource, sys
from lowrank_kit.cli.main import main
try:
    main()
finally:
    print("PEAK_RSS_BYTES", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)
"""


def run(tree: Path, ratios: str, out: Path) -> dict:
    argv = ["bench", "accuracy", "--model", "smollm2-135m", "--data", "text:pydoc", "--methods", "svd"]
    argv += ["--ratios", ratios, "--seq-len", "128", "--limit", "2", "--batch-size", "2", "--no-cache"]
    argv += ["--output", str(out)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], cwd=tree, env=env, capture_output=True, text=True, check=False
    )
    peak = [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_BYTES")]
    if proc.returncode != 0 or not peak:
        raise SystemExit(f"grid run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    cells = json.loads((out / "results.json").read_text())["cells"]
    return {"ratios": ratios, "cells": len(cells), "peak_rss_bytes": int(peak[0])}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to run")
    p.add_argument("--output", type=Path, required=True)
    args = p.parse_args(argv)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=args.tree, capture_output=True, text=True, check=False
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(args.tree, "0.5", Path(tmp) / "one")
        six = run(args.tree, "0.9,0.8,0.7,0.6,0.5,0.3", Path(tmp) / "six")
    result = {
        "benchmark": "grid_memory",
        "tree_commit": commit,
        "model": "smollm2-135m (float32)",
        "machine": platform.processor() or platform.machine(),
        "one_cell": one,
        "six_cells": six,
        "six_over_one": six["peak_rss_bytes"] / one["peak_rss_bytes"],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
