"""Benchmark: `launcher train recipes/llama-3.1-70b/lora.yaml --dry_run --tiny` on this machine, offline.

As shipped, without overrides: the dry run reads the hub dataset's shipped stand-in sample
(recipes/stand-ins/ultrachat_sample.jsonl) and the stand-in Llama 3.1 tokenizer, neither being on this machine; the
real run's topology is the recipe's header (4 nodes x 8 GPUs).
Runs the whole command as a user would, measures its wall time, and writes the time and the report to
bench/out/dry_run.md. Target: under 2 minutes on a 2-core CPU.

Usage: python bench/dry_run.py [WORKDIR]   (default bench/out)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/llama-3.1-70b/lora.yaml"


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "bench" / "out")
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as runs:
        command = [sys.executable, "-m", "launcher", "train", RECIPE, "--dry_run", "--tiny", "--nproc_per_node", "8",
                   "--nnodes", "4", f"--run.output_dir={runs}/run"]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"dry run failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    report = result.stdout[result.stdout.index("--- dry run report"):].rstrip()
    shown = " ".join(c if " " not in c else f"'{c}'" for c in command[3:]).replace(runs, "RUNS")
    text = (f"# `launcher {shown}`\n\nwall time: {seconds:.1f} s (target < 120 s)\n\n```\n{report}\n```\n")
    (work / "dry_run.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
