"""The no-GPU compile gates' worker processes, run in the background while the
simulator tests run.

CI has two cores and the simulator tests keep one of them busy; the gates (Numba
compiles of every shipped tensor-core specialization, then ptxas) are CPU work of
their own. Each gate module registers its worker command lines at import; once pytest
has collected the tests, tests/conftest.py starts the workers of the gates it will
run, at most CONCURRENCY at a time and at a lower CPU priority, and moves the gate
tests to the end of the run. A gate's fixture then only collects what its workers
printed (or runs them itself if they have not started)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
CONCURRENCY = 2
NICE = 10  # the simulator tests keep their core; the gates take what is left
TIMEOUT_S = 1200

# The environment the workers run in, taken at import (collection, before any test runs):
# the workers run in threads beside the simulator tests, and a test that monkeypatches
# os.environ (NBFLASH_WGMMA_OVERLAP=0, NBFLASH_WGMMA=0) for its own duration must not
# change what a worker started meanwhile compiles (a wgmma gate run once lost its four
# overlap-only window kernels that way and failed its count)
_ENVIRONMENT = dict(os.environ)
_commands: dict[str, list[list[str]]] = {}  # gate name -> worker command lines
_jobs: dict[tuple, "_Job"] = {}
_pending: "queue.Queue[_Job]" = queue.Queue()
_lock = threading.Lock()


class _Job:
    def __init__(self, argv):
        self.argv = argv
        self.claimed = False  # a runner (or the waiting test) has taken it
        self.done = threading.Event()
        self.result = None  # subprocess.CompletedProcess

    def run(self, nice):
        env = dict(_ENVIRONMENT, NUMBA_ENABLE_CUDASIM="0")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, env.get("PYTHONPATH", "")]))
        worker = os.path.join(HERE, self.argv[0])
        try:
            self.result = subprocess.run(
                [sys.executable, worker, *self.argv[1:]], env=env, capture_output=True, text=True,
                timeout=TIMEOUT_S, preexec_fn=(lambda: os.nice(NICE)) if nice and hasattr(os, "nice") else None,
            )
        except subprocess.TimeoutExpired as e:
            self.result = subprocess.CompletedProcess(e.cmd, -1, e.stdout or "", f"timed out after {TIMEOUT_S} s")
        finally:
            self.done.set()


def register(name: str, commands: list[list[str]]):
    """Worker command lines of gate ``name``: [script in tests/, args...] each."""
    _commands[name] = commands


def _job(argv) -> _Job:
    with _lock:
        key = tuple(argv)
        if key not in _jobs:
            _jobs[key] = _Job(argv)
        return _jobs[key]


def _runner():
    while True:
        job = _pending.get()
        with _lock:
            if job.claimed:
                continue
            job.claimed = True
        job.run(nice=True)


def start(names):
    """Queue the workers of the named gates and start the background runners."""
    for name in names:
        for argv in _commands.get(name, []):
            _pending.put(_job(argv))
    for _ in range(CONCURRENCY):
        threading.Thread(target=_runner, daemon=True).start()


def rows(name: str) -> list[dict]:
    """Every JSON row the workers of gate ``name`` printed, after they finished
    (asserting each exited cleanly); runs any worker not yet started right here."""
    out = []
    for argv in _commands[name]:
        job = _job(argv)
        with _lock:
            mine = not job.claimed
            job.claimed = True
        if mine:
            job.run(nice=False)
        job.done.wait()
        r = job.result
        assert r.returncode == 0, f"{' '.join(argv)}: exit {r.returncode}\n{r.stderr[-3000:]}"
        out += [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return out


def module_gate(path: str):
    """The gate a test module registered (by its file name), or None."""
    return _module_gates.get(os.path.basename(path))


_module_gates: dict[str, str] = {}


def register_module(module_file: str, name: str, commands: list[list[str]]):
    """register() for the gate that test module ``module_file`` checks."""
    register(name, commands)
    _module_gates[os.path.basename(module_file)] = name
