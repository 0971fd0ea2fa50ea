"""What `jax.distributed` itself does when a process dies or an id is given twice (why
`mlem_jax.parallel` runs each process under a supervisor that words the end in one line). Run: python docs/figures/jax_distributed/probe.py

Three cases on localhost, CPU, gloo collectives, heartbeat_timeout_seconds=5:
1. ids 0, 1, 1 of 3: what each process prints and when it ends;
2. process 1 of 2 killed (SIGKILL) while both run collectives: process 0's end;
3. the same with process 0 computing (no collective): the coordination service's end;
4. case 3 with the client's own hook, `missed_heartbeat_callback` (jaxlib's private API).
For each process: exit status, seconds from the event to its end, lines on stderr, and the
first line that names the cause."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

WORKER = textwrap.dedent("""
    import os, sys, time
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid, n, port, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if mode == "hook":
        from jax._src import distributed
        from jax._src.lib import _jax
        def hook(status):
            sys.stderr.write("error: a peer was lost\\n"); sys.stderr.flush(); os._exit(1)
        st = distributed.global_state
        if pid == 0:
            st.service = _jax.get_distributed_runtime_service(f"[::]:{port}", n, heartbeat_timeout=5,
                                                              shutdown_timeout=5)
        st.num_processes, st.process_id = n, pid
        st.client = _jax.get_distributed_runtime_client(f"localhost:{port}", pid, init_timeout=20,
                                                        heartbeat_timeout=5, shutdown_timeout=5,
                                                        missed_heartbeat_callback=hook)
        st.client.connect()
    else:
        jax.distributed.initialize(f"localhost:{port}", n, pid, initialization_timeout=20,
                                   heartbeat_timeout_seconds=5, shutdown_timeout_seconds=5)
    print("joined", flush=True)
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    while True:
        if mode != "collective" and pid == 0:
            time.sleep(0.2)
            continue
        multihost_utils.process_allgather(jnp.ones(3))
        time.sleep(0.2)
""")


def cause(text):
    for key in ("bad_cast", "Duplicate", "Connection closed", "Terminating", "heartbeat", "error:"):
        for line in text.splitlines():
            if key in line:
                return line.strip()[:160]
    return (text.strip().splitlines() or [""])[-1][:160]


def run(n, ids, port, mode, kill=None):
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "worker.py")
        with open(script, "w") as f:
            f.write(WORKER)
        procs = []
        for i in ids:
            procs.append(subprocess.Popen([sys.executable, script, str(i), str(n), str(port), mode],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            time.sleep(0.5)
        event = time.monotonic()
        if kill is not None:
            time.sleep(8)
            procs[kill].send_signal(signal.SIGKILL)
            event = time.monotonic()
        ended = {}
        while len(ended) < len(procs) and time.monotonic() < event + 90:
            for j, p in enumerate(procs):
                if j not in ended and p.poll() is not None:
                    ended[j] = time.monotonic() - event
            time.sleep(0.05)
        for j, (i, p) in enumerate(zip(ids, procs)):
            if j not in ended:
                p.kill()
            err = p.communicate()[1]
            if j == kill:
                continue
            when = f"{ended[j]:5.1f} s after the event" if j in ended else "still running at 90 s"
            print(f"  process {i}: status {p.returncode}, {when}, {len(err.splitlines())} lines on stderr; "
                  f"{cause(err)!r}")


if __name__ == "__main__":
    import jax
    print(f"jax {jax.__version__}")
    print("1. ids 0, 1, 1 of 3 (the event: the last start)")
    run(3, [0, 1, 1], 23501, "collective")
    print("2. process 1 of 2 killed during collectives")
    run(2, [0, 1], 23511, "collective", kill=1)
    print("3. process 1 of 2 killed while process 0 computes")
    run(2, [0, 1], 23521, "compute", kill=1)
    print("4. case 3 with missed_heartbeat_callback")
    run(2, [0, 1], 23531, "hook", kill=1)
