"""Before any rank trains, every rank reports in: the bad input it found, and whether it sees the run directory
that rank 0 writes. A problem on one rank (its host lacks a file or a credential, or does not share the disk)
then stops every rank within seconds, with one line from rank 0 naming the hosts. Without this, that rank's error
was printed by no one and the others waited for it in a collective until the 30-minute timeout.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

from launcher.errors import RecipeError

SEEN_WITHIN = 10.0  # seconds: a network filesystem may serve a cached "no such file" for a moment
_reported = False


def reported() -> bool:
    return _reported


def report_in(run_dir: Path | None, problem: str | None) -> None:
    """Collective: every rank calls it once (a rank whose gate failed joins the process group here to do so).
    Raises RecipeError on every rank if any rank has a problem; the message names the ranks and hosts."""
    global _reported
    import torch.distributed as dist

    joined_here = not dist.is_initialized()
    if joined_here:
        import deepspeed
        import torch

        if torch.cuda.is_available():  # NCCL collectives run on the rank's own device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        deepspeed.init_distributed()
    _reported = True
    rank, world, host = dist.get_rank(), dist.get_world_size(), socket.gethostname()
    token = run_dir / "ranks" / f".visible-{uuid.uuid4().hex}" if rank == 0 and run_dir and not problem else None
    if token:
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text(host + "\n")
    first: list = [None] * world
    dist.all_gather_object(first, (host, problem, token and str(token)))
    shared = first[0][2]
    views: list = [None] * world
    dist.all_gather_object(views, problem is not None or shared is None or _sees(Path(shared)))
    if token:
        token.unlink(missing_ok=True)
    message = verdict(first, views, run_dir)
    if joined_here:  # this rank stops here: leave cleanly (a live gloo group aborts the process at exit)
        dist.destroy_process_group()
    if message:
        raise RecipeError(message)


def _sees(path: Path) -> bool:
    deadline = time.monotonic() + SEEN_WITHIN
    while time.monotonic() < deadline:
        if path.parent.is_dir() and path.name in os.listdir(path.parent):  # a listing revalidates NFS's cache
            return True
        time.sleep(0.5)
    return False


def verdict(reports: list[tuple[str, str | None, str | None]], views: list[bool], run_dir: Path | None) -> str:
    """One line per distinct problem (one line in all when every rank found the same), '' when there is none."""
    problems: dict[str, list[tuple[int, str]]] = {}
    for rank, ((host, problem, _), sees) in enumerate(zip(reports, views, strict=True)):
        if problem is None and not sees:
            problem = (f"{run_dir}: this host does not see the run directory rank 0 ({reports[0][0]}) writes to; "
                       "the launcher needs run.output_dir on a filesystem every node shares (checkpoints, resume "
                       "and consolidation read every rank's files there)")
        if problem is not None:
            problems.setdefault(problem, []).append((rank, host))
    if len(problems) == 1 and len(next(iter(problems.values()))) == len(reports):
        return next(iter(problems))
    return "\nerror: ".join(f"{_where(ranks)}: {problem}" for problem, ranks in problems.items())


def _where(ranks: list[tuple[int, str]]) -> str:
    hosts: dict[str, list[int]] = {}
    for rank, host in ranks:
        hosts.setdefault(host, []).append(rank)
    return ", ".join(f"{host} (rank{'s' * (len(r) > 1)} {','.join(map(str, r))})" for host, r in hosts.items())
