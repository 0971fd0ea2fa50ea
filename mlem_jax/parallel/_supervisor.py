"""One line, not a C++ abort, when `jax.distributed` stops a process of a multi-process run.

JAX's coordination service detects a lost process (`heartbeat_timeout_seconds`) and a
process id given twice (it refuses the second registration), and then ends every process
it stops with a C++ `Check failure` of 14-47 lines on stderr (measured with jax 0.10.2:
`docs/figures/jax_distributed/probe.log`). Nothing in the aborting process can shorten
that: the abort does not return to Python, and the client's hook for a handler
(`missed_heartbeat_callback`) crashes with `std::bad_cast`. So the program runs as a
child of a small supervisor (this module) that passes its stdout through untouched and
its stderr through line by line, holding back only what can be the start of an abort
(glog `W`/`E`/`F` lines, a Python traceback, and what follows them; a `W` or `E` line that
no abort follows within 5 s is released). When the child ends:

* normally, or with a failure this module does not know: everything held back is written
  out unchanged (nothing is lost, only delayed) and the child's status is returned;
* stopped by the coordination service: one line naming the cause as JAX reports it (the
  ids that stopped sending heartbeats; an id registered twice; a peer that closed its
  connection in a collective; processes missing at the join timeout), status 1, and the
  full report in a log file that the line names.

No port, no thread in the child, no change to how JAX detects anything: JAX's own
heartbeat and registration are the mechanism, this only words its end. If the
supervisor itself is killed the child gets SIGKILL too (Linux `PR_SET_PDEATHSIG`), so
the run never keeps an orphan that still answers heartbeats.
"""

from __future__ import annotations

import codecs
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time

# child processes of the supervisor carry this, so that a supervised program does not supervise itself again
SUPERVISED_ENV = "MLEM_JAX_SUPERVISED"
EXIT_STATUS = 1
GRACE_S = 5.0  # a `W` or `E` line with no abort this long after it was only a log line: released

_GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\]")


def _classify(report: str, process_id=None, num_processes=None, coordinator=None) -> str | None:
    """The one line for a report of JAX's coordination service, or None when it is not one."""
    me = "this process" if process_id is None else f"process {process_id}"
    of = "" if num_processes is None else f" of {num_processes}"
    ids = "" if num_processes is None else f" in 0..{num_processes - 1}"
    at = "" if coordinator is None else f" at {coordinator}"
    unhealthy = re.search(r"tasks are unhealthy \(stopped sending heartbeats\):\s*([\d,\s]+?)\s*(?:The tasks|\[|$)",
                          report)
    if unhealthy:
        lost = ", ".join(re.findall(r"\d+", unhealthy.group(1)))
        return (f"process {lost}{of} stopped sending heartbeats (it died, was killed or lost the network), so JAX's "
                f"coordination service stopped {me}: the run is stopped and what it was computing is not written; "
                "restart every process")
    if "ALREADY_EXISTS" in report and "RegisterTask" in report:
        return (f"{me}{of}: its id was given twice (JAX's coordination service{at} refused this second "
                f"registration): give every process its own --process-id{ids}")
    peer = re.search(r"Connection closed by peer \[?([^\s\]]+)\]?:?(\d*)", report)
    if peer and ("Gloo" in report or "gloo" in report):
        who = peer.group(1) + (f":{peer.group(2)}" if peer.group(2) else "")
        return (f"a peer process ({who}) closed its connection in a collective (it died or was killed), so {me} "
                "stopped too: the run is stopped and what it was computing is not written; restart every process")
    if "Failed to send RPC to coordination service" in report:
        return (f"process 0 (the coordinator{at}) died, was killed or cannot be reached, so {me} stopped too: the "
                "run is stopped and what it was computing is not written; restart every process")
    if "DEADLINE_EXCEEDED" in report and "RegisterTask" in report:
        return (f"{me}{of} could not join the run{at} in time: nothing answered there, or not every process "
                "joined (JAX's coordination service does not say which id is missing). Start process 0 on the "
                f"coordinator's host, every process with the same --coordinator and --num-processes and its own "
                f"--process-id{ids}, and check that the port is reachable; a process id given twice ends the "
                "others like this")
    fatal = re.search(r"detected fatal errors\..*?absl::Status: ([^\n]+)", report, re.S)
    if fatal:
        return (f"JAX's distributed service stopped {me} ({fatal.group(1).strip()[:200]}): another process of "
                "the run probably died; the run is stopped and what it was computing is not written")
    return None


class _StderrFilter:
    """Pass the child's stderr through, holding back what may be the start of an abort."""

    def __init__(self, out):
        self.out, self.line, self.held = out, "", []
        self.mode = "live"  # "live", "held" (until the end) or "grace" (a W/E line: released if no abort follows)
        self.decided = None  # for the current line: None (too short to tell), True (pass through), False (hold)
        self.grace_since = None

    def _decide(self, text: str):
        """Whether a line passes through (True), is held (False), or cannot be told yet (None)."""
        if text.startswith("\r") or text[:1] not in ("E", "F", "T", "W"):
            return self.mode == "live"
        if len(text) < 30 and "\n" not in text:
            return None
        if text.startswith("Traceback (most recent call last)") or (text[0] == "F" and _GLOG.match(text)):
            self.mode = "held"
        elif text[0] in ("E", "W") and _GLOG.match(text):
            if self.mode == "live":
                self.mode, self.grace_since = "grace", time.monotonic()
        else:
            return self.mode == "live"
        return False

    def feed(self, chunk: str) -> None:
        while chunk:
            nl = chunk.find("\n")
            part, chunk = (chunk, "") if nl < 0 else (chunk[:nl + 1], chunk[nl + 1:])
            if self.decided is None:
                self.line += part
                self.decided = self._decide(self.line)
                if self.decided is None:
                    continue
                part, self.line = self.line, ""
            (self._write if self.decided else self.held.append)(part)
            if part.endswith("\n"):
                self.decided = None

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def tick(self) -> None:
        """Release `W`/`E` lines that no abort followed within `GRACE_S`."""
        if self.mode == "grace" and time.monotonic() - self.grace_since > GRACE_S:
            self.release()
            self.mode = "live"

    def release(self) -> None:
        text = "".join(self.held) + self.line
        self.held, self.line = [], ""
        if text:
            self._write(text)

    def report(self) -> str:
        return "".join(self.held) + self.line


# the child's first step, before it becomes `argv`: SIGKILL when the supervisor dies (Linux PR_SET_PDEATHSIG, kept
# across exec), then exec. A small interpreter instead of `preexec_fn`, which would fork a process that runs JAX.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(128 + signal.SIGKILL)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n")


def supervise(argv, *, process_id=None, num_processes=None, coordinator=None, prefix: str = "error: ",
              log_dir=None) -> int:
    """Run `argv` as a child process and return its exit status, turning an end by JAX's
    coordination service (a lost peer, an id given twice, processes missing at the join
    timeout) into one line on stderr and status 1.

    The child's stdout is its own; its stderr passes through, except that glog `W`/`E`/`F`
    lines and Python tracebacks are held back until it is clear whether they are an abort
    (then the line, with the full report written to a log file it names) or not (then
    they are written unchanged). SIGINT and SIGTERM sent to the supervisor go to the child.
    A child killed by signal `s` (other than an abort worded here) gives status 128 + s.

    Args:
      argv: the command to run, e.g. `[sys.executable, "train.py", ...]`.
      process_id: this process's id, to name it in the line (optional).
      num_processes: the processes in the run, to name the valid ids (optional).
      coordinator: "host:port" of the run, to name it in the line (optional).
      prefix: what the line starts with (the CLI gives "mlem-jax sample: error: ").
      log_dir: where the full report is written (default: the temporary directory).
    """
    env = dict(os.environ, **{SUPERVISED_ENV: "1"})
    argv = list(argv)
    if sys.platform.startswith("linux"):
        argv = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]
    # its own process group: a Ctrl-C at the terminal reaches the supervisor only, which passes it on once
    # (the child would otherwise get it twice, the second interrupting its clean-up of the first)
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
    child = subprocess.Popen(argv, stderr=subprocess.PIPE, env=env, **group)
    forwarded = {}

    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            forwarded[s] = signal.signal(s, forward)
        except ValueError:  # not the main thread
            pass
    filt = _StderrFilter(sys.stderr)
    fd = child.stderr.fileno()
    decode = codecs.getincrementaldecoder("utf-8")("replace").decode  # a character may span two reads
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    filt.feed(decode(b"", final=True))
                    break
                filt.feed(decode(chunk))
            filt.tick()
        status = child.wait()
    finally:
        for s, previous in forwarded.items():
            signal.signal(s, previous)
    report = filt.report()
    line = _classify(report, process_id, num_processes, coordinator) if status != 0 else None
    if line is None:
        filt.release()
        return status if status >= 0 else 128 - status
    fd_log, path = tempfile.mkstemp(prefix=f"mlem-jax-process-{process_id if process_id is not None else 'x'}-",
                                    suffix=".log", dir=log_dir)
    with os.fdopen(fd_log, "w") as f:
        f.write(report)
    sys.stderr.write(f"{prefix}{line} (JAX's report: {path})\n")
    sys.stderr.flush()
    return EXIT_STATUS


def main(argv=None) -> int:
    """`python -m mlem_jax.parallel COMMAND ...`: run COMMAND under the supervisor."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m mlem_jax.parallel [--] COMMAND [ARG ...]\n\nRun one process of a multi-process run "
              "(COMMAND calls mlem_jax.parallel.initialize_distributed) so that an end by JAX's coordination "
              "service is one line on stderr, not a C++ abort.", file=sys.stderr)
        return 0 if argv else 2
    return supervise(argv)
