"""What `launcher launch` shows of DeepSpeed's runner and its ranks: everything but their routine noise.

The child's stdout and stderr are piped; every byte goes to the run's log file as it came, and the console gets the
same bytes less the lines in HIDDEN: DeepSpeed's INFO lines and two WARNINGs that every CPU or single-node run prints.
Nothing is lost by hiding them: the full log stays in the run directory, and every other line, other DeepSpeed
warnings and errors included, still shows. With verbose the console gets everything too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

VERBOSE = "LAUNCHER_VERBOSE"  # set by launch --verbose; the ranks then print every logged dict, as HF's trainer does

_STAMP = rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\] "  # DeepSpeed's logger: [%(asctime)s] [%(levelname)s] ...
_WARNING = _STAMP + rb"\[WARNING\] \[[^\]]*\] "

HIDDEN: tuple[re.Pattern[bytes], ...] = (
    re.compile(_STAMP + rb"\[INFO\] "),
    re.compile(_WARNING + rb"Setting accelerator to CPU\."),
    re.compile(_WARNING + rb"Unable to find hostfile, will proceed with training with local resources only\."),
)

HOLD_LIMIT = 4096  # a partial line longer than this is shown even if it might still turn out hidden
_END = re.compile(rb"[\r\n]")
# The start every hidden line shares, "0" standing for any digit: a partial that departs from it is shown at once.
_PREFIX = b"[0000-00-00 00:00:00,000] ["
_LEVELS = (b"INFO] ", b"WARNING] ")


def is_hidden(line: bytes) -> bool:
    return any(pattern.match(line) for pattern in HIDDEN)


def _may_be_hidden(start: bytes) -> bool:
    """Whether a segment beginning with these bytes could still match one of HIDDEN."""
    stamp, level = start[:len(_PREFIX)], start[len(_PREFIX):]
    if not all(0x30 <= c <= 0x39 if p == 0x30 else c == p for c, p in zip(stamp, _PREFIX, strict=False)):
        return False
    return any(level[:len(want)] == want[:len(level)] for want in _LEVELS)


class LineFilter:
    """Drops hidden lines from a byte stream fed in arbitrary chunks. Segments end at \\n or \\r (tqdm redraws with
    \\r and no newline); a partial segment is held only while it could still be a hidden line, so progress bars and
    prompts show without lag."""

    def __init__(self) -> None:
        self._held = b""  # start of the current segment, not shown yet: it may still become a hidden line
        self._passing = False  # the current segment's start was shown: the rest of it is shown too
        self._drop_lf = False  # a hidden line ended with \r: a \n right after it belongs to it

    def feed(self, data: bytes) -> bytes:
        shown, pos = [], 0
        for end in _END.finditer(data):
            shown.append(self._segment(data[pos:end.end()]))
            pos = end.end()
        if pos < len(data):
            shown.append(self._partial(data[pos:]))
        return b"".join(shown)

    def flush(self) -> bytes:
        """The held rest at end of stream (dropped if it is a hidden line without its terminator)."""
        held, self._held, self._passing, self._drop_lf = self._held, b"", False, False
        return b"" if is_hidden(held) else held

    def _segment(self, segment: bytes) -> bytes:
        drop_lf, self._drop_lf = self._drop_lf, False
        if drop_lf and segment == b"\n":
            return b""
        if self._passing:
            self._passing = False
            return segment
        line, self._held = self._held + segment, b""
        if is_hidden(line[:-1]):
            self._drop_lf = line.endswith(b"\r")
            return b""
        return line

    def _partial(self, part: bytes) -> bytes:
        self._drop_lf = False
        if self._passing:
            return part
        self._held += part
        if len(self._held) <= HOLD_LIMIT and _may_be_hidden(self._held):
            return b""
        shown, self._held, self._passing = self._held, b"", True
        return shown


class Tee:
    """Runs a child with its stdout and stderr piped: the raw bytes to the log, the filtered ones to the console."""

    def __init__(self, log_path: Path, verbose: bool, console_out=None, console_err=None):
        self.log_path, self.verbose = Path(log_path), verbose
        self._console = (console_out, console_err)
        self._lock = threading.Lock()
        self._log = None
        self._threads: list[threading.Thread] = []

    def popen(self, command, env, **popen_kwargs) -> subprocess.Popen:
        out, err = self._console
        out, err = out or sys.stdout.buffer, err or sys.stderr.buffer
        self._open_log()
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen_kwargs)
        for pipe, console in ((child.stdout, out), (child.stderr, err)):
            thread = threading.Thread(target=self._pump, args=(pipe, console), daemon=True)
            thread.start()
            self._threads.append(thread)
        return child

    def write_log(self, text: str) -> None:
        """A line of the launcher's own (a header, say) in the log; not shown."""
        self._open_log()
        self._to_log((text if text.endswith("\n") else text + "\n").encode())

    def close(self, timeout: float = 5.0) -> bool:
        """Waits for both streams to end, then closes the log. A grandchild may hold a pipe open long after the child
        exits: past the timeout the readers are left behind (daemon threads) and False is returned."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            if self._log is not None:
                self._log.close()
        return not any(thread.is_alive() for thread in self._threads)

    def _open_log(self) -> None:
        with self._lock:
            if self._log is None or self._log.closed:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                self._log = open(self.log_path, "ab")  # noqa: SIM115 -- open until close()

    def _pump(self, pipe, console) -> None:
        line_filter = None if self.verbose else LineFilter()
        try:
            while chunk := os.read(pipe.fileno(), 65536):
                self._to_log(chunk)
                self._show(console, chunk if line_filter is None else line_filter.feed(chunk))
            if line_filter is not None:
                self._show(console, line_filter.flush())
        finally:
            pipe.close()

    def _to_log(self, data: bytes) -> None:
        with self._lock:
            if self._log is not None and not self._log.closed:  # closed: close() gave up waiting on this stream
                self._log.write(data)
                self._log.flush()

    @staticmethod
    def _show(console, data: bytes) -> None:
        if not data:
            return
        try:
            console.write(data)
            console.flush()
        except (OSError, ValueError):  # a console gone (closed terminal, broken pipe): keep draining into the log
            pass
