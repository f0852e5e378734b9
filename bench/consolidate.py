"""Benchmark: `launcher consolidate` against DeepSpeed's own zero_to_fp32 on one ZeRO-3 checkpoint, and against
the I/O floor: the least any tool must do, which is to copy the fp32 partitions' bytes to files of the sizes the
launcher writes and fsync them.

Builds (once) a 2-rank CPU ZeRO-3 checkpoint of a ~374M-parameter Llama-shaped model, then consolidates it to fp32
safetensors with 1 GB shards both ways, each as a whole process measured by /usr/bin/time (wall time, peak RSS),
with the checkpoint's files read once beforehand so all start from a warm page cache. The floor is measured the
same way, as a process of its own (this script with --floor): plain Python reads of the fp32 partitions (the byte
ranges of each rank's flat groups) through a 256 KiB buffer, written to as many files as the launcher writes, of
the same sizes (zeros make up the headers), a thread per file as the launcher does, each fsynced, then the
directory. Five trials, the three tools in turn in each, so all see the same disk and page cache moods; the medians
are reported, with the load average.

Usage: python bench/consolidate.py [WORKDIR]   (default bench/out; needs about 8 GB of disk)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TRIALS = 5  # this VM's disk writes the same 1.5 GB in 1.2 to 4.3 s from run to run: report the median of five
BUFFER = 256 * 2**10  # the floor's copy buffer: the fastest of 64 KiB to 16 MiB here (it stays in the CPU's cache)
THREADS = 4  # the floor's files written at once: as many as the launcher's shards (launcher/safetensors_stream.py)
TARGET = 1.5  # launcher / floor


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
    size = sum(f.stat().st_size for f in output.glob("*.safetensors")) or sum(
        f.stat().st_size for f in output.glob("floor-*"))
    return {"label": label, "seconds": seconds, "rss_gb": rss_kb / 1e6, "output_gb": size / 1e9}


def warm(path: Path) -> None:
    for f in path.rglob("*.pt"):
        with open(f, "rb") as handle:
            while handle.read(1 << 24):
                pass


def floor_spec(ckpt: Path, launcher_out: Path, spec: Path) -> None:
    """What the floor copies: the byte ranges of every rank's fp32 flat groups (located by the launcher's reader,
    which imports no torch), and the sizes of the shards the launcher wrote."""
    sys.path.insert(0, str(REPO))
    from launcher.zero_checkpoint import ZeroCheckpoint

    zero = ZeroCheckpoint(ckpt)
    reads = [(s.path, s.offset, s.numel() * 4) for r in range(zero.world) for s in zero.optim(r)]
    sizes = [f.stat().st_size for f in sorted(launcher_out.glob("*.safetensors"))]
    spec.write_text(json.dumps({"reads": reads, "sizes": sizes}))


def floor(spec: Path, out: Path) -> None:
    """Copy the spec's byte ranges, in order, into files of the spec's sizes (zeros fill the room the launcher's
    headers take), a thread per file (at most THREADS, like the launcher), each fsynced once written, then the
    directory: what any consolidation must do, done the fastest plain way found here, and nothing else."""
    plan = json.loads(spec.read_text())
    out.mkdir()
    jobs = _split(plan["reads"], plan["sizes"])
    with ThreadPoolExecutor(THREADS) as pool:  # file copies release the GIL
        list(pool.map(_copy, [out / f"floor-{i:05d}" for i in range(1, len(jobs) + 1)], jobs))
    directory = os.open(out, os.O_RDONLY)
    os.fsync(directory)
    os.close(directory)


def _split(reads: list, sizes: list[int]) -> list[list]:
    """For each output file, the (path, offset, length) runs of the reads it takes, in order; path None: zeros."""
    runs, jobs = [list(r) for r in reads] + [[None, 0, sum(sizes)]], []
    for size in sizes:
        jobs.append([])
        while size:
            path, offset, length = runs[0]
            n = min(size, length)
            jobs[-1].append((path, offset, n))
            runs[0], size = [path, offset + n, length - n], size - n
            if runs[0][2] == 0:
                runs.pop(0)
    return jobs


def _copy(target: Path, runs: list) -> None:
    buffer, zeros = memoryview(bytearray(BUFFER)), memoryview(bytes(BUFFER))
    with open(target, "wb") as f:
        for path, offset, length in runs:
            source = os.open(path, os.O_RDONLY) if path else None
            for start in range(offset, offset + length, BUFFER):
                n = min(BUFFER, offset + length - start)
                f.write(zeros[:n] if source is None else buffer[: os.preadv(source, [buffer[:n]], start)])
            if source is not None:
                os.close(source)
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    if sys.argv[1:2] == ["--floor"]:
        return floor(Path(sys.argv[2]), Path(sys.argv[3]))
    work = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "bench/out").absolute()
    work.mkdir(parents=True, exist_ok=True)
    ckpt = build_checkpoint(work)
    spec = work / "floor.json"
    spec.unlink(missing_ok=True)  # rewritten from this run's first launcher output
    zero_to_fp32 = ("from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict as c; "
                    f"c('{ckpt}', '{work / 'ds_out'}', safe_serialization=True, max_shard_size='1GB')")
    tools = (
        ("deepspeed zero_to_fp32", [sys.executable, "-c", zero_to_fp32], work / "ds_out"),
        ("launcher consolidate", [str(BIN / "launcher"), "consolidate", str(ckpt), str(work / "ours"), "--dtype",
                                  "fp32", "--max_shard_size", "1GB", "--base_model", str(work / "base")],
         work / "ours"),
        ("I/O floor (copy, fsync)", [sys.executable, __file__, "--floor", str(spec), str(work / "floor")],
         work / "floor"),
    )
    load_before = os.getloadavg()
    trials: dict[str, list[dict]] = {label: [] for label, _, _ in tools}
    for trial in range(1, TRIALS + 1):  # in turn, so all see the same disk and page cache moods
        for label, command, output in tools:
            if output.name == "floor" and not spec.exists():
                floor_spec(ckpt, work / "ours", spec)
            warm(ckpt)
            trials[label].append(measure(label, command, output))
            print(f"[{trial}/{TRIALS}] {label}: {trials[label][-1]['seconds']:.2f} s, peak RSS "
                  f"{trials[label][-1]['rss_gb']:.2f} GB", flush=True)
    report(trials, work, load_before, os.getloadavg())


def report(trials: dict, work: Path, load_before: tuple, load_after: tuple) -> None:
    runs = [sorted(found, key=lambda r: r["seconds"])[TRIALS // 2] for found in trials.values()]  # the medians
    ds, ours, least = runs
    ratio = ours["seconds"] / least["seconds"]
    lines = ["| tool | wall time | peak RSS | output |", "|---|---|---|---|"]
    lines += [f"| {r['label']} | {r['seconds']:.2f} s | {r['rss_gb']:.2f} GB | {r['output_gb']:.2f} GB |" for r in runs]
    lines.append(f"| ratio (launcher / deepspeed) | {ours['seconds'] / ds['seconds']:.2f} | "
                 f"{ours['rss_gb'] / ds['rss_gb']:.2f} | |")
    lines.append(f"| ratio (launcher / I/O floor) | {ratio:.2f} | | |")
    spread = "; ".join(f"{label} {min(r['seconds'] for r in found):.2f} to {max(r['seconds'] for r in found):.2f} s"
                       for label, found in trials.items())
    paired = sorted(a["seconds"] / b["seconds"] for a, b in zip(*list(trials.values())[1:], strict=True))
    notes = [f"Medians of {TRIALS} trials ({spread}). launcher / floor: {ratio:.2f} (target <= {TARGET}; the median "
             f"of each trial's own ratio: {paired[TRIALS // 2]:.2f}). Load average (1, 5, 15 min): "
             f"{', '.join(f'{x:.2f}' for x in load_before)} before, {', '.join(f'{x:.2f}' for x in load_after)} after; "
             f"{os.cpu_count()} CPUs."]
    table = "\n".join(lines) + "\n\n" + notes[0]
    (work / "consolidate.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
