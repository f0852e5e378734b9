"""Benchmark: `launcher consolidate` against DeepSpeed's own zero_to_fp32 on one ZeRO-3 checkpoint.

Builds (once) a 2-rank CPU ZeRO-3 checkpoint of a ~374M-parameter Llama-shaped model, then consolidates it to fp32
safetensors with 1 GB shards both ways, each as a whole process measured by /usr/bin/time (wall time, peak RSS),
with the checkpoint's files read once beforehand so both start from a warm page cache; five alternating trials,
the median of each reported.

Usage: python bench/consolidate.py [WORKDIR]   (default bench/out; needs about 8 GB of disk)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRIALS = 5  # this VM's disk writes the same 1.5 GB in 1.2 to 4.3 s from run to run: report the median of five


def build_checkpoint(work: Path) -> Path:
    if not (work / "ckpt" / "latest").is_file():
        print("building the ZeRO-3 checkpoint (2 CPU ranks, one step)...", flush=True)
        subprocess.run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29731",
                        str(REPO / "bench/make_zero_checkpoint.py"), str(work)], check=True, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    return work / "ckpt"


def measure(label: str, command: list[str], output: Path) -> dict:
    shutil.rmtree(output, ignore_errors=True)
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        raise SystemExit(f"{label} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", result.stderr)
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    size = sum(f.stat().st_size for f in output.rglob("*.safetensors"))
    return {"label": label, "seconds": seconds, "rss_gb": rss_kb / 1e6, "output_gb": size / 1e9}


def warm(path: Path) -> None:
    for f in path.rglob("*.pt"):
        with open(f, "rb") as handle:
            while handle.read(1 << 24):
                pass


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "bench/out").absolute()
    work.mkdir(parents=True, exist_ok=True)
    ckpt = build_checkpoint(work)
    zero_to_fp32 = ("from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict as c; "
                    f"c('{ckpt}', '{work / 'ds_out'}', safe_serialization=True, max_shard_size='1GB')")
    tools = (
        ("deepspeed zero_to_fp32", [sys.executable, "-c", zero_to_fp32], work / "ds_out"),
        ("launcher consolidate", [str(BIN / "launcher"), "consolidate", str(ckpt), str(work / "ours"), "--dtype",
                                  "fp32", "--max_shard_size", "1GB", "--base_model", str(work / "base")],
         work / "ours"),
    )
    trials: dict[str, list[dict]] = {label: [] for label, _, _ in tools}
    for trial in range(1, TRIALS + 1):  # alternating, so both see the same disk and page cache moods
        for label, command, output in tools:
            warm(ckpt)
            trials[label].append(measure(label, command, output))
            print(f"[{trial}/{TRIALS}] {label}: {trials[label][-1]['seconds']:.2f} s, peak RSS "
                  f"{trials[label][-1]['rss_gb']:.2f} GB", flush=True)
    runs = [sorted(found, key=lambda r: r["seconds"])[TRIALS // 2] for found in trials.values()]  # the medians
    ds, ours = runs
    lines = ["| tool | wall time | peak RSS | output |", "|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['seconds']:.2f} s | {r['rss_gb']:.2f} GB | {r['output_gb']:.2f} GB |" for r in runs]
    lines.append(f"| ratio (launcher / deepspeed) | {ours['seconds'] / ds['seconds']:.2f} | "
                 f"{ours['rss_gb'] / ds['rss_gb']:.2f} | |")
    table = "\n".join(lines)
    (work / "consolidate.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
