"""The supervisor of a multi-process run's process (`mlem_jax.parallel.supervise`): stderr
passes through unchanged unless JAX's coordination service ends the child, which is then
one line. The real runtime's ends are in test_sharding.py; here the children are small
scripts that print what jax 0.10.2 printed (docs/figures/jax_distributed/probe.log)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from mlem_jax.parallel import _supervisor
from mlem_jax.parallel._supervisor import _classify, _StderrFilter, supervise

# what the runtime wrote (jax 0.10.2), trimmed to the lines that name the cause
ABORT = "F1207 10:11:52.409115   25177 client.h:80] Terminating process because the JAX distributed service " \
        "detected fatal errors. This most likely indicates that another task died; see the other task logs for " \
        "more details. Disable Python buffering, i.e. `python -u`, to be sure to see all the previous output. " \
        "absl::Status: "
UNHEALTHY = ABORT + "UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\nThe tasks " \
    "have crashed. Check the task logs for an earlier error, or scheduler events (e.g. preemption, eviction) to " \
    "debug further.\n\nRPC: /xla.coordination.CoordinationService/PollForError [type.googleapis.com/tensorflow." \
    "CoordinationServiceError='']\n*** Check failure stack trace: ***\n    @     0x7f32ed040634  absl::Flush()\n"
DUPLICATE = ABORT + "ALREADY_EXISTS: Aborted connect attempt as there is a request from a newer incarnati\n\n" \
    "RPC: /xla.coordination.CoordinationService/RegisterTask\n*** Check failure stack trace: ***\n"
JOIN = ABORT + "DEADLINE_EXCEEDED: Deadline Exceeded\n\nRPC: /xla.coordination.CoordinationService/RegisterTask\n" \
    "*** Check failure stack trace: ***\n"
LEADER = ABORT + "UNAVAILABLE: Failed to send RPC to coordination service. Either the leader task was " \
    "preempted/died/restarted unexpectedly or this task is experiencing network issues.\n*** Check failure\n"
GLOO = "Traceback (most recent call last):\n  File \"w.py\", line 3, in <module>\nValueError: UNKNOWN: Gloo " \
    "AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] Connection closed by peer " \
    "[127.0.0.1]:30445\n"


@pytest.mark.parametrize("report, start", [
    (UNHEALTHY, "process 1 of 2 stopped sending heartbeats"),
    (DUPLICATE, "process 1 of 2: its id was given twice"),
    (JOIN, "process 1 of 2 could not join the run at h:1 in time"),
    (LEADER, "process 0 (the coordinator at h:1) died"),
    (GLOO, "a peer process (127.0.0.1:30445) closed its connection in a collective"),
    (ABORT + "INTERNAL: something new\n", "JAX's distributed service stopped process 1 (INTERNAL: something new)"),
])
def test_each_end_of_the_coordination_service_is_named(report, start):
    assert _classify(report, 1, 2, "h:1").startswith(start)
    assert "\n" not in _classify(report, 1, 2, "h:1")


def test_other_failures_are_not_worded():
    assert _classify("Traceback (most recent call last):\nValueError: a bug\n") is None
    assert _classify("E1207 10:11:52.408947   25177 some.cc:1] a log line\n") is None


def run_child(code, capfd, **kwargs):
    """supervise() over `python -c code`; (status, stdout, stderr) as the terminal would see them."""
    status = supervise([sys.executable, "-c", textwrap.dedent(code)], **kwargs)
    out, err = capfd.readouterr()
    return status, out, err


def test_output_passes_through_unchanged(capfd):
    """Progress bars (carriage returns, no newline), plain lines, glog warnings with their
    continuation lines, a logged error that no abort follows: all of stderr arrives as the
    child wrote it, stdout untouched, and the child's status is returned."""
    text = ("start\n\r 10%|#  |\r 50%|#####|\r100%|##########|\n"
            "W1207 10:15:19.941699   25826 preemption_sync_manager.cc:147] Failed: UNAVAILABLE\nmore of it\n"
            "E1207 10:15:19.941699   25826 a.cc:1] an error logged and survived\nafter\r 1/2")
    status, out, err = run_child(f"""
        import sys
        print("to stdout", flush=True)
        for piece in {text!r}.split("|"):
            sys.stderr.write(piece + "|"); sys.stderr.flush()
        sys.exit(3)""", capfd)
    assert status == 3 and out == "to stdout\n"
    assert err == text + "|"


def test_a_character_split_across_two_reads_arrives_whole(capfd):
    """A progress bar's block character, its UTF-8 bytes written (and read) in two pieces."""
    status, _, err = run_child("""
        import sys, time
        sys.stderr.buffer.write("\u2588".encode()[:2]); sys.stderr.buffer.flush(); time.sleep(0.3)
        sys.stderr.buffer.write("\u2588".encode()[2:] + b"|\\n"); sys.stderr.buffer.flush()""", capfd)
    assert status == 0 and err == "\u2588|\n"


def test_an_abort_by_the_coordination_service_is_one_line_and_its_report_is_kept(capfd, tmp_path):
    status, out, err = run_child(f"""
        import os, sys
        sys.stderr.write("working\\n"); sys.stderr.flush()
        sys.stderr.write({UNHEALTHY!r}); sys.stderr.flush()
        os.abort()""", capfd, process_id=0, num_processes=2, prefix="mlem-jax train: error: ", log_dir=tmp_path)
    assert status == _supervisor.EXIT_STATUS == 1
    lines = err.splitlines()
    assert lines[0] == "working" and len(lines) == 2, err
    assert lines[1].startswith("mlem-jax train: error: process 1 of 2 stopped sending heartbeats"), lines[1]
    path = lines[1].rpartition("(JAX's report: ")[2].rstrip(")")
    assert os.path.dirname(path) == str(tmp_path)
    with open(path) as f:
        assert f.read() == UNHEALTHY


def test_a_bug_keeps_its_traceback(capfd):
    status, _, err = run_child("raise ValueError('a bug')", capfd)
    assert status == 1 and err.startswith("Traceback (most recent call last)") and "ValueError: a bug" in err


def test_a_child_killed_by_a_signal_gives_the_shell_status(capfd):
    status, _, err = run_child("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", capfd)
    assert status == 128 + signal.SIGKILL and err == ""


def test_a_warning_that_no_abort_follows_is_released_after_the_grace(monkeypatch):
    class Out:
        text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    now = [100.0]
    monkeypatch.setattr(_supervisor.time, "monotonic", lambda: now[0])
    out = Out()
    f = _StderrFilter(out)
    f.feed("W1207 10:15:19.941699   25826 a.cc:147] a warning\nand the line after\n")
    f.tick()
    assert out.text == ""
    now[0] += _supervisor.GRACE_S + 0.1
    f.tick()
    assert out.text == "W1207 10:15:19.941699   25826 a.cc:147] a warning\nand the line after\n"
    f.feed("\r 3/4")
    assert out.text.endswith("\r 3/4")


def spawn_supervised(code, tmp_path, **popen):
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "child.py"
    script.write_text(f"import os, signal, sys, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                      + textwrap.dedent(code))
    sup = subprocess.Popen([sys.executable, "-m", "mlem_jax.parallel", sys.executable, str(script)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    t0 = time.monotonic()
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() - t0 < 60:
        time.sleep(0.05)
    return sup, int(pid_file.read_text())


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_the_supervisor_kills_its_child(tmp_path):
    """No orphan that keeps answering JAX's heartbeats after a scheduler kills the supervisor."""
    sup, child = spawn_supervised("time.sleep(120)", tmp_path)
    sup.kill()
    sup.wait()
    t0 = time.monotonic()
    while alive(child) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert not alive(child)


def test_sigterm_reaches_the_child(tmp_path):
    sup, _ = spawn_supervised("""
        signal.signal(signal.SIGTERM, lambda *a: (sys.stderr.write("child: terminated\\n"), sys.exit(143)))
        time.sleep(120)""", tmp_path)
    sup.send_signal(signal.SIGTERM)
    _, err = sup.communicate(timeout=60)
    assert sup.returncode == 143 and err == "child: terminated\n"


def test_a_ctrl_c_reaches_the_child_once(tmp_path):
    """A terminal's Ctrl-C goes to the foreground process group: the supervisor's. The child runs in
    a group of its own, so it gets the one SIGINT the supervisor passes on, not a second one."""
    sup, child = spawn_supervised("""
        seen = []
        def count(*a):
            seen.append(1)
        signal.signal(signal.SIGINT, count)
        while not seen:
            time.sleep(0.05)
        time.sleep(1.0)
        sys.stderr.write(f"child: {len(seen)} SIGINT\\n")
        sys.exit(130)""", tmp_path, start_new_session=True)  # the supervisor leads a group, as at a terminal
    os.killpg(sup.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: SIGINT to the foreground group
    _, err = sup.communicate(timeout=60)
    assert sup.returncode == 130 and err == "child: 1 SIGINT\n"
