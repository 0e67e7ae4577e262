"""A faster thread scheduler for Numba's CUDA simulator, and warp-level exchange.

Numba's simulator runs each CUDA thread as a Python thread and releases
``syncthreads`` by busy-polling every thread, which on a small CPU spends most of
the time polling. This module swaps in barrier-based blocks (same semantics: a
barrier releases when every live thread of the block waits; exited threads do not
block it) and gives each warp an exchange area, which the simulator twins of
warp-wide instructions (mma, ldmatrix, shuffles) use to see their peers' registers.
Installed only when kernels run on the simulator.
"""

from __future__ import annotations

import threading

import numpy as np

WARP = 32


class _Barrier:
    """A reusable barrier whose party count shrinks as threads exit."""

    def __init__(self, parties: int):
        self._cond = threading.Condition()
        self._live = parties
        self._waiting = 0
        self._generation = 0
        self._broken = False

    def wait(self):
        with self._cond:
            if self._broken:
                raise RuntimeError("simulator barrier broken: another thread failed")
            generation = self._generation
            self._waiting += 1
            if self._waiting == self._live:
                self._release()
            else:
                while generation == self._generation and not self._broken:
                    self._cond.wait()
            if self._broken:
                raise RuntimeError("simulator barrier broken: another thread failed")

    def leave(self):
        with self._cond:
            self._live -= 1
            if self._waiting and self._waiting == self._live:
                self._release()

    def abort(self):
        with self._cond:
            self._broken = True
            self._cond.notify_all()

    def _release(self):
        self._waiting = 0
        self._generation += 1
        self._cond.notify_all()


class Warp:
    """Per-warp state: a barrier for its threads and one slot per lane."""

    LANES = WARP

    def __init__(self, size: int):
        self.barrier = _Barrier(size)
        self.slots = [None] * self.LANES

    def exchange(self, lane: int, value):
        """Publish ``value`` for this lane; return every lane's value (a list of LANES)."""
        self.slots[lane] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before all have read
        return values


def current_warp() -> Warp:
    return threading.current_thread().nbflash_warp


WARPGROUP = 4 * WARP


class Warpgroup(Warp):
    """Per-warpgroup state (4 consecutive warps, Hopper's wgmma unit): the same
    exchange over 128 lanes (lane = thread index % 128)."""

    LANES = WARPGROUP


def current_warpgroup() -> Warpgroup:
    return threading.current_thread().nbflash_warpgroup


def _run_block(self, grid_point, *args):
    from numba.cuda.simulator.kernel import BlockThread

    block_points = list(np.ndindex(*self._block_dim))
    barrier = _Barrier(len(block_points))
    warps = [Warp(min(WARP, len(block_points) - w)) for w in range(0, len(block_points), WARP)]
    groups = [Warpgroup(min(WARPGROUP, len(block_points) - w)) for w in range(0, len(block_points), WARPGROUP)]
    threads = []

    for block_point in block_points:

        def target():
            try:
                self._f(*args)
            except BaseException:
                barrier.abort()
                for warp in warps + groups:
                    warp.barrier.abort()
                raise
            finally:
                barrier.leave()

        t = BlockThread(target, self, grid_point, block_point, self._debug)
        t.syncthreads = barrier.wait
        t.nbflash_warp = warps[t.thread_id // WARP]
        t.nbflash_warpgroup = groups[t.thread_id // WARPGROUP]
        threads.append(t)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [t for t in threads if t.exception]
    # Report the thread that failed first, not one that saw the barrier break.
    failed.sort(key=lambda t: "simulator barrier broken" in str(t.exception[0]))
    if failed:
        raise failed[0].exception[0].with_traceback(failed[0].exception[1])


def install():
    """Replace the simulator's polling block scheduler (idempotent)."""
    from numba.cuda.simulator import kernel

    kernel.BlockManager.run = _run_block
