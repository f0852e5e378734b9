"""Resuming on another number of ranks: a ZeRO checkpoint holds one optimizer shard per rank, so the launcher converts
it to DeepSpeed's universal format (one folder per parameter: fp32 weights and Adam moments, unsharded) with
DeepSpeed's own converter, once, into the checkpoint itself, and the ranks load that for the new world size
(DeepSpeed's `checkpoint.load_universal`).

The conversion is written to a staging folder and moved into place; its marker (universal.json, the file sizes) is
written last, and no rank loads a conversion without a marker whose sizes still hold: a conversion cut short is
done again, one damaged since is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from launcher import checkpoints
from launcher.errors import RecipeError

MARKER = "universal.json"
LATEST = "latest_universal"  # what DeepSpeed reads under load_universal: the tag of the universal folder
WAIT = 3600.0  # seconds another node waits for the first node's conversion


def tag(checkpoint: Path) -> str:
    return (checkpoint / "latest").read_text().strip() + "_universal"


def ready(checkpoint: Path) -> bool:
    """Converted, and every converted file has the size its marker recorded."""
    if not (checkpoint / MARKER).is_file():
        return False
    try:
        recorded = json.loads((checkpoint / MARKER).read_text())["files"]
    except (ValueError, KeyError):
        raise RecipeError(f"{checkpoint / MARKER}: not a marker this launcher wrote; move it away and the "
                          "conversion is done again") from None
    for relative, size in recorded.items():
        path = checkpoint / relative
        found = path.stat().st_size if path.is_file() else None
        if found != size:
            state = "is missing" if found is None else f"has {found} bytes, {size} when it was converted"
            raise RecipeError(f"{checkpoint}: {relative} {state}; the universal conversion changed after it was "
                              f"written: delete {checkpoint / MARKER} and {checkpoint / tag(checkpoint)} and it is "
                              "converted again")
    return True


def convert(checkpoint: Path) -> None:
    """DeepSpeed's converter (python -m deepspeed.checkpoint.ds_to_universal), its progress on the console, into a
    staging folder in the checkpoint; then moved into place, and the marker written last."""
    if ready(checkpoint):
        return
    name = tag(checkpoint)
    staging = checkpoint / f".universal-{os.getpid()}"
    for stale in [*checkpoint.glob(".universal-*"), checkpoint / name, checkpoint / LATEST]:  # an earlier try's
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    print(f"converting {checkpoint} to DeepSpeed's universal format ({name}), to resume on another number of ranks",
          flush=True)
    command = [sys.executable, "-W", "ignore::RuntimeWarning", "-m", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", str(checkpoint / name.removesuffix("_universal")), "--output_folder",
               str(staging / name), "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"]
    started, log = time.monotonic(), checkpoint.parent.parent / "logs" / f"universal-{checkpoint.name}.log"
    if (code := _run(command, log)) != 0:
        shutil.rmtree(staging, ignore_errors=True)
        last = next((line for line in reversed(log.read_text(errors="replace").splitlines()) if line.strip()), "")
        raise RecipeError(f"{checkpoint}: DeepSpeed's universal conversion failed (exit code {code}: {last[:300]}; "
                          f"all of it: {log}); the checkpoint itself is unchanged: resume with the number of ranks "
                          "it was saved by")
    os.replace(staging / name, checkpoint / name)
    shutil.rmtree(staging, ignore_errors=True)
    (checkpoint / LATEST).write_text(name)
    sizes = {p.relative_to(checkpoint).as_posix(): p.stat().st_size
             for p in sorted((checkpoint / name).rglob("*")) if p.is_file()}
    checkpoints.sync_dir(checkpoint)
    tmp = checkpoint / f".{MARKER}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps({"tag": name, "files": sizes}, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, checkpoint / MARKER)
    checkpoints.sync_dir(checkpoint)
    print(f"converted in {time.monotonic() - started:.0f} s: {checkpoint / name}", flush=True)


def _run(command: list[str], log: Path) -> int:
    """The converter's stages (its stdout) on the console; its progress bars and any traceback (stderr) only in LOG,
    with everything else."""
    from launcher import console

    with open(os.devnull, "wb") as nowhere:
        tee = console.Tee(log, verbose=False, console_err=nowhere)
        try:
            return tee.popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"}).wait()
        finally:
            tee.close()


def wait_for(checkpoint: Path, timeout: float = WAIT) -> None:
    """Another node: the first node's launch converts; this one starts its ranks once the marker is there."""
    deadline, said = time.monotonic() + timeout, False
    while not ready(checkpoint):
        if time.monotonic() > deadline:
            raise RecipeError(f"{checkpoint}: no universal conversion after {timeout:.0f} s; the first node "
                              "converts it before its ranks start: see its log")
        if not said:
            print(f"waiting for the first node to convert {checkpoint} to the universal format", flush=True)
            said = True
        time.sleep(2)


def unshare_adam_steps(optimizer) -> int:
    """DeepSpeed's ZeRO-3 universal load gives every parameter group the same `step` tensor, which torch's Adam then
    advances once per group per step (2 groups: the bias correction runs twice as fast). Each group gets its own
    copy. Returns how many were unshared."""
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)
    seen, unshared = set(), 0
    for state in getattr(inner, "state", {}).values():
        step = state.get("step") if isinstance(state, dict) else None
        if torch.is_tensor(step):
            if id(step) in seen:
                state["step"] = step.clone()
                unshared += 1
            seen.add(id(step))
    return unshared
