"""launcher/console.py: DeepSpeed's noise hidden from the console, every byte in the log, no lag on progress bars."""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
from collections import Counter

from launcher.console import HOLD_LIMIT, LineFilter, Tee

ACCEL = (b"[2026-12-02 16:11:59,541] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU."
         b" If you have GPU or other accelerator, we were unable to detect it.\n")
HOSTFILE = (b"[2026-12-02 16:11:59,987] [WARNING] [runner.py:214:fetch_hostfile] Unable to find hostfile, will proceed"
            b" with training with local resources only.\n")
INFO = b"[2026-12-02 16:12:02,348] [INFO] [launch.py:152:main] WORLD INFO DICT: {'localhost': [0, 1]}\n"
MATTERS = b"[2026-12-02 16:12:03,001] [WARNING] [engine.py:1:x] something that matters\n"
HIDDEN_LINES = (ACCEL, HOSTFILE, INFO)

# (stream, bytes) in the order the child writes them, each flushed on its own
WRITES = [
    ("out", ACCEL), ("out", b"ordinary line\n"), ("out", HOSTFILE), ("out", MATTERS), ("out", INFO),
    ("out", b"[rank0]: not DeepSpeed's format\n"), ("out", b"\xff\xfe not UTF-8\n"),
    ("err", b"\r  0%|"), ("err", b"\r 50%|"), ("err", b"\r100%|"), ("err", b"\n"), ("err", INFO),
    ("err", b"RuntimeError: something broke\n"),
]


def child_script(writes) -> str:
    return ("import sys\n"
            f"for name, data in {writes!r}:\n"
            "    stream = sys.stdout.buffer if name == 'out' else sys.stderr.buffer\n"
            "    stream.write(data)\n"
            "    stream.flush()\n")


def written(name: str, keep=lambda data: True) -> bytes:
    return b"".join(data for stream, data in WRITES if stream == name and keep(data))


def run_child(tmp_path, verbose: bool, script: str):
    out, err = io.BytesIO(), io.BytesIO()
    tee = Tee(tmp_path / "run" / "logs" / "launch.log", verbose, console_out=out, console_err=err)
    child = tee.popen([sys.executable, "-c", script], env=os.environ.copy())
    assert child.wait(timeout=10) == 0
    assert tee.close()
    return out.getvalue(), err.getvalue(), tee.log_path.read_bytes()


def test_console_lacks_exactly_the_hidden_lines(tmp_path):
    out, err, _ = run_child(tmp_path, False, child_script(WRITES))
    shown = lambda data: data not in HIDDEN_LINES
    assert out == written("out", shown)
    assert err == written("err", shown)
    assert MATTERS in out and b"\r 50%|\r100%|\n" in err


def test_verbose_shows_everything(tmp_path):
    out, err, _ = run_child(tmp_path, True, child_script(WRITES))
    assert out == written("out") and err == written("err")


def test_log_holds_every_byte_after_its_header(tmp_path):
    log = tmp_path / "run" / "logs" / "launch.log"
    log.parent.mkdir(parents=True)
    log.write_bytes(b"an earlier attempt\n")
    tee = Tee(log, verbose=False, console_out=io.BytesIO(), console_err=io.BytesIO())
    tee.write_log("== launch: header ==")
    child = tee.popen([sys.executable, "-c", child_script(WRITES)], env=None)
    assert child.wait(timeout=10) == 0 and tee.close()
    head = b"an earlier attempt\n== launch: header ==\n"
    content = log.read_bytes()
    assert content.startswith(head)
    body = content[len(head):]
    # the two streams interleave in the log in whatever order the readers got them; each write stays whole
    assert Counter(body) == Counter(written("out") + written("err"))
    assert all(data in body for _, data in WRITES)
    assert body.index(ACCEL) < body.index(HOSTFILE) < body.index(MATTERS)  # each only on stdout


class Sink:
    """A console that records when each write arrived (written from the reader thread, read from the test)."""

    def __init__(self):
        self._lock, self._writes = threading.Lock(), []

    def write(self, data: bytes) -> None:
        with self._lock:
            self._writes.append((time.monotonic(), bytes(data)))

    def flush(self) -> None:
        pass

    def first_holding(self, wanted: bytes) -> float | None:
        with self._lock:
            seen = b""
            for at, data in self._writes:
                seen += data
                if wanted in seen:
                    return at
        return None


def test_progress_shows_before_its_line_ends(tmp_path):
    err = Sink()
    tee = Tee(tmp_path / "launch.log", verbose=False, console_out=io.BytesIO(), console_err=err)
    script = "import sys, time\nsys.stderr.buffer.write(b'\\r 50%|'); sys.stderr.flush(); time.sleep(1.5)\n"
    started = time.monotonic()
    child = tee.popen([sys.executable, "-c", script], env=None)
    try:
        while err.first_holding(b" 50%|") is None and time.monotonic() - started < 1.2:
            time.sleep(0.01)
        at = err.first_holding(b" 50%|")
        assert at is not None and at - started < 1.2
        assert child.poll() is None  # still asleep: shown while its line was open, not at the end of the stream
    finally:
        child.kill()
        child.wait()
        tee.close()


def test_close_does_not_wait_on_a_grandchild_holding_the_pipes(tmp_path):
    tee = Tee(tmp_path / "launch.log", verbose=False, console_out=io.BytesIO(), console_err=io.BytesIO())
    script = ("import subprocess, sys\n"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n")
    child = tee.popen([sys.executable, "-c", script], env=None, start_new_session=True)
    try:
        assert child.wait(timeout=10) == 0
        started = time.monotonic()
        assert tee.close(timeout=0.3) is False
        assert time.monotonic() - started < 1.5
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the grandchild, in the child's own session (start_new_session passed)


def test_popen_failure_is_raised(tmp_path):
    tee = Tee(tmp_path / "launch.log", verbose=False, console_out=io.BytesIO(), console_err=io.BytesIO())
    try:
        tee.popen([str(tmp_path / "no-such-program")], env=None)
    except (FileNotFoundError, PermissionError):
        pass
    else:
        raise AssertionError("started a program that does not exist")
    finally:
        assert tee.close()


def feed_all(line_filter: LineFilter, chunks) -> bytes:
    return b"".join(line_filter.feed(chunk) for chunk in chunks) + line_filter.flush()


def test_hidden_line_split_at_every_byte_boundary_is_dropped():
    stream = b"before\n" + INFO + ACCEL.replace(b"\n", b"\r\n") + HOSTFILE + b"after\n"
    assert feed_all(LineFilter(), (stream[i:i + 1] for i in range(len(stream)))) == b"before\nafter\n"
    for i in range(len(stream) + 1):
        assert feed_all(LineFilter(), (stream[:i], stream[i:])) == b"before\nafter\n", i


def test_carriage_return_stream_passes_without_lag():
    stream = b"\r  0%|\r 50%|\r100%|"
    line_filter, shown = LineFilter(), b""
    for i in range(len(stream)):
        shown += line_filter.feed(stream[i:i + 1])
        assert shown == stream[:i + 1]
    assert line_filter.flush() == b""


def test_partial_ruled_out_by_its_start_passes_at_once_and_its_rest_too():
    line_filter = LineFilter()
    assert line_filter.feed(b"[rank0]: step") == b"[rank0]: step"
    assert line_filter.feed(b"[2026-12-02 16:1") == b"[2026-12-02 16:1"  # the rest of a line already shown
    assert line_filter.feed(b"2:02,348] [INFO] \n") == b"2:02,348] [INFO] \n"
    assert line_filter.feed(b"[2026-12-02 16:1") == b""  # may still become a DeepSpeed line: held
    assert line_filter.feed(b"2:02,348] [ERROR] boom") == b"[2026-12-02 16:12:02,348] [ERROR] boom"
    assert line_filter.feed(b"\n") == b"\n"


def test_held_partial_is_passed_once_past_the_limit():
    line = INFO[:-1] + b"x" * 5000
    line_filter, shown = LineFilter(), b""
    for i in range(0, len(line), 100):
        shown += line_filter.feed(line[i:i + 100])
        fed = min(i + 100, len(line))
        assert shown == (line[:fed] if fed > HOLD_LIMIT else b""), fed
    assert line_filter.feed(b"\n") == b"\n"
    assert line_filter.flush() == b""


def test_unterminated_hidden_line_at_end_of_stream_is_dropped_and_others_kept():
    assert feed_all(LineFilter(), (INFO[:-1],)) == b""
    assert feed_all(LineFilter(), (b"[2026-12-02 16:12",)) == b"[2026-12-02 16:12"
