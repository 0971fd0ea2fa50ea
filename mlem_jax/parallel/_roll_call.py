"""A roll call of the processes of a multi-process run, before and during `jax.distributed`.

It does only what `jax.distributed` cannot, measured with jax 0.10.2
(`docs/figures/jax_distributed/probe.py` and its log): with ids 0, 1, 1 of 3 every process
aborts with a C++ stack that says "another task died" and names no id, 25 s after the start;
a killed peer is detected by JAX's heartbeat (`heartbeat_timeout_seconds`, which
`initialize_distributed` sets) but every survivor ends in a C++ abort of 21-47 lines, and the
client's hook for a handler (`missed_heartbeat_callback`) crashes with `std::bad_cast`. The
roll call is a small TCP service that process 0 runs on the coordinator's host at `port + 1`:

* at join, every other process connects and claims its id (`"ID HOST PID"`); when every id is
  claimed once, each gets `ok` and then calls `jax.distributed.initialize`. A duplicate id, or an
  id still missing at the join timeout, is one line in every process instead;
* during the run the connections stay open: each process sends a beat every `BEAT_S` seconds and
  `bye` at a normal exit. A connection that closes without `bye` (a killed process: the kernel
  closes its sockets at once) or stays silent for `heartbeat_timeout_s` is a lost process: every
  survivor prints one line naming it and exits with status 1 (`os._exit`: a collective that waits
  on the lost process cannot be interrupted otherwise; atexit handlers are skipped, but a
  multi-process orbax save in flight could not finish anyway, since it waits on every process,
  and the checkpoint before it stays whole). Process 0 watches every connection (closed
  or silent); the others watch process 0's connection (closed), so losing process 0 stops them too.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import threading
import time

BEAT_S = 1.0
EXIT_STATUS = 1


class RollCallError(RuntimeError):
    """A duplicate or missing process id at join (one line, for the CLI)."""


def _line(sock_file) -> str:
    line = sock_file.readline()
    return line.decode("utf-8", "replace").strip() if line else ""


def _lost(message: str) -> None:
    """Every survivor's end: one line, status 1, without waiting for the collective."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    os._exit(EXIT_STATUS)


def _who(claim: tuple) -> str:
    return f"{claim[0]} pid {claim[1]}"


class _Server:
    """Process 0's side: collect the claims, then watch every connection."""

    def __init__(self, port: int, num_processes: int, heartbeat_timeout_s: float):
        self.n, self.timeout = num_processes, heartbeat_timeout_s
        try:  # every interface, as the coordinator itself (docs/sharding.md: a private network)
            if socket.has_dualstack_ipv6():
                self.sock = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True,
                                                 backlog=num_processes + 4)
            else:
                self.sock = socket.create_server(("", port), backlog=num_processes + 4)
        except OSError as e:
            raise RollCallError(
                f"process_id: process 0 cannot open the roll call at port {port} ({e.strerror}): another process 0 "
                f"of this run is probably running already (the same --process-id 0 given twice?), or the port, the "
                f"coordinator's port + 1, is taken.") from e
        self.claims = {0: (socket.gethostname(), os.getpid())}
        self.conns = {}

    def gather(self, deadline: float) -> None:
        """Wait for ids 1..n-1; refuse duplicates and missing ids (one line in every process)."""
        while len(self.claims) < self.n:
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                missing = sorted(set(range(self.n)) - set(self.claims))
                self._refuse(f"process ids {missing} of {self.n} did not join the run in time (only "
                             f"{sorted(self.claims)} did): start every process with the same --coordinator and "
                             "--num-processes and its own --process-id")
            conn.settimeout(10)
            f = conn.makefile("rb")
            try:
                pid_s, host, os_pid = _line(f).split()
                pid = int(pid_s)
            except ValueError:
                conn.close()
                continue
            conn.settimeout(None)
            if pid in self.claims:
                self.conns[("dup", len(self.conns))] = (conn, f)
                self._refuse(f"process id {pid} was given twice, to {_who(self.claims[pid])} and to {host} pid "
                             f"{os_pid}: give every process its own --process-id in 0..{self.n - 1}")
            self.claims[pid] = (host, int(os_pid))
            self.conns[pid] = (conn, f)
        for conn, _ in self.conns.values():
            conn.sendall(b"ok\n")

    def _refuse(self, message: str):
        for conn, _ in self.conns.values():
            try:
                conn.sendall(f"refused {message}\n".encode())
                conn.close()
            except OSError:
                pass
        self.sock.close()
        raise RollCallError(f"process_id: {message}.")

    def watch(self) -> None:
        threading.Thread(target=self.refuse_late, daemon=True).start()
        for pid, (conn, f) in self.conns.items():
            threading.Thread(target=self._watch_one, args=(pid, conn, f), daemon=True).start()

    def _watch_one(self, pid, conn, f):
        conn.settimeout(self.timeout)
        try:
            while True:
                msg = _line(f)
                if msg == "bye":
                    return
                if not msg:
                    why = "its connection closed without a normal exit (killed?)"
                    break
        except socket.timeout:
            why = f"it was silent for {self.timeout:g} s"
        except OSError as e:
            why = f"its connection failed ({e})"
        message = (f"process {pid} of {self.n} ({_who(self.claims[pid])}) was lost mid-run: {why}. The run is "
                   "stopped and what it was computing is not written; restart every process")
        for other, (c, _) in list(self.conns.items()):
            if other != pid:
                try:
                    c.sendall(f"lost {message}\n".encode())
                except OSError:
                    pass
        _lost(message)

    def refuse_late(self):
        """After the roll call: a late claim is an id given twice (the run has all its processes)."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.settimeout(10)
                claim = _line(conn.makefile("rb")).split()
                pid = int(claim[0])
                held = f", held by {_who(self.claims[pid])}" if pid in self.claims else ""
                conn.sendall(f"refused the run already has its {self.n} processes: process id {pid} was given "
                             f"twice{held}; give every process its own --process-id in 0..{self.n - 1}\n".encode())
            except (OSError, ValueError, IndexError):
                pass
            finally:
                conn.close()


class _Client:
    """Every other process's side: claim the id, then beat and listen."""

    def __init__(self, host: str, port: int, process_id: int, num_processes: int, deadline: float):
        self.n = num_processes
        while True:
            try:
                self.conn = socket.create_connection((host.strip("[]"), port), timeout=2)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise RollCallError(
                        f"coordinator: process {process_id} of {num_processes} could not join the run at "
                        f"{host}:{port - 1} in time (nothing answers at its roll call, port {port}: {e}). Start "
                        "process 0 with the same --coordinator and --num-processes, on the coordinator's host, "
                        "and check that the port and the next one are reachable.") from e
                time.sleep(0.5)
        self.conn.sendall(f"{process_id} {socket.gethostname()} {os.getpid()}\n".encode())
        self.conn.settimeout(max(1.0, deadline - time.monotonic()) + 5)
        self.f = self.conn.makefile("rb")
        try:
            reply = _line(self.f)
        except socket.timeout:
            reply = ""
        if reply != "ok":
            self.conn.close()
            text = reply.partition(" ")[2] if reply.startswith("refused") else (
                "process 0 gave no answer at the roll call in time (the run may already have its processes: the "
                "same --process-id given twice?)")
            raise RollCallError(f"process_id: {text}.")
        self.conn.settimeout(None)

    def watch(self) -> None:
        threading.Thread(target=self._beat, daemon=True).start()
        threading.Thread(target=self._listen, daemon=True).start()

    def _beat(self):
        while True:
            try:
                self.conn.sendall(b"beat\n")
            except OSError:
                return
            time.sleep(BEAT_S)

    def _listen(self):
        try:
            msg = _line(self.f)
        except OSError:
            msg = ""
        if msg.startswith("lost "):
            _lost(msg[len("lost "):])
        if msg != "bye":  # process 0 went away without a normal exit
            _lost(f"process 0 of {self.n} (the coordinator) was lost mid-run: its connection closed without a "
                  "normal exit (killed?). The run is stopped and what it was computing is not written; restart "
                  "every process")


def roll_call(coordinator: str, num_processes: int, process_id: int, timeout_s: float,
              heartbeat_timeout_s: float = 30.0):
    """Claim `process_id` at the roll call of the run at `coordinator` (process 0 hosts it at the
    coordinator's port + 1) and return a `start_watching()` to call once `jax.distributed` is up.
    Raises `RollCallError` (one line) on a duplicate or missing id."""
    host, _, port = coordinator.rpartition(":")
    deadline = time.monotonic() + timeout_s
    if process_id == 0:
        party = _Server(int(port) + 1, num_processes, heartbeat_timeout_s)
        if num_processes > 1:
            party.gather(deadline)
    else:
        party = _Client(host, int(port) + 1, process_id, num_processes, deadline)

    def start_watching():
        if num_processes > 1:
            party.watch()
            atexit.register(_goodbye, party)

    return start_watching


def _goodbye(party) -> None:
    """A normal exit: tell the others (they stop watching this process) and close."""
    conns = [party.conn] if isinstance(party, _Client) else [c for c, _ in party.conns.values()]
    for c in conns:
        try:
            c.sendall(b"bye\n")
        except OSError:
            pass
