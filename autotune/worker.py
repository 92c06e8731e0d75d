"""Worker processes: candidates run outside the tuning process, with a time limit each.

A candidate that raises, hangs, exits or is killed by a signal (an illegal memory access, a
segmentation fault in a driver) must cost one trial, never the sweep. So every compile, check and
timing happens in a child process: a fresh interpreter running ``python -m autotune.worker``
(never a ``fork``: CUDA cannot survive one; and unlike ``multiprocessing``'s spawn it never
re-imports the caller's main script), reached through a socket pair with the caller's
``sys.path``, so families defined outside ``kernels`` (a test-only family) import there too:

- a reply within the limit is the trial's result;
- no reply within the limit: the child is killed, the trial fails as timed out;
- the connection closes first: the child died; the trial fails with its exit code or signal;
- either way the next request starts a fresh child. A live child is reused across trials and
  tuning calls, so Triton's in-process caches and the last shape's inputs stay warm.

A :class:`WorkerPool` is one timing worker plus, on a GPU, helper workers that only compile
(:func:`autotune.evaluate._compile_only`) while the timing worker measures: compilation dominates
the cost of a GEMM trial, and the helpers fill Triton's disk cache from which the timing worker
then loads the kernel.
"""
from __future__ import annotations

import atexit
import concurrent.futures as cf
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

STARTUP_TIMEOUT_S = 300.0


class WorkerError(RuntimeError):
    """A worker process could not be started (the environment, not a candidate, is broken)."""


def _serve(conn: Connection) -> None:
    """Entry point of a worker process: answer requests until told to exit or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the tuning process's to handle
    import kernels  # noqa: F401  (selects the interpreter before anything imports triton)
    from autotune.evaluate import Session

    session = Session()
    conn.send({"ready": os.getpid()})
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg.get("op") == "exit":
            return
        conn.send(session.handle(msg))


def _death(exitcode: int | None) -> str:
    if exitcode is None:
        return "worker stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"worker killed by signal {name}"
    return f"worker exited with exit code {exitcode}"


class Worker:
    """One child process and the connection to it; restarted on demand after it dies or is killed."""

    def __init__(self, name: str):
        self.name = name
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def spawn(self) -> None:
        """Start the child (it imports torch and Triton, so wait for it with :meth:`wait_ready`)."""
        self.kill()
        ours, theirs = socket.socketpair()
        path = [p or os.getcwd() for p in sys.path]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "autotune.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        """Block until the child says it is ready; :class:`WorkerError` if it dies or takes too long."""
        try:
            ready = self._conn.poll(timeout) and "ready" in self._conn.recv()
        except (EOFError, OSError):
            ready = False
        if not ready:
            code = self._proc.poll() if self._proc is not None else None
            self.kill()
            raise WorkerError(f"autotune worker {self.name!r} failed to start: {_death(code)}")

    def ensure(self) -> None:
        if not self.alive:
            self.spawn()
            self.wait_ready()

    def request(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request and wait up to ``timeout`` seconds for the reply.

        Returns the child's reply, or ``{"status": "failed", "reason": ...}`` when the child hung
        (it is killed) or died (its exit code or signal is the reason).
        """
        self.ensure()
        try:
            self._conn.send(msg)
        except (BrokenPipeError, OSError):
            self.spawn()
            self.wait_ready()
            self._conn.send(msg)
        try:
            answered = self._conn.poll(timeout)
        except (EOFError, OSError):
            answered = True
        except BaseException:
            self.kill()  # interrupted mid-request: its late reply must not answer the next request
            raise
        if not answered:
            self.kill()
            return {"status": "failed", "reason": f"timed out after {timeout:g} s: worker killed and restarted"}
        try:
            reply = self._conn.recv()
        except (EOFError, OSError):
            try:
                code = self._proc.wait(10)
            except subprocess.TimeoutExpired:
                code = None
            reason = _death(code)
            self.kill()
            return {"status": "failed", "reason": f"{reason} (restarted)"}
        if reply.pop("restart", False):
            self.kill()
        return reply

    def kill(self) -> None:
        """Stop the child now (SIGKILL) and forget it."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn = None, None

    def close(self) -> None:
        """Ask the child to exit, then make sure it has."""
        if self.alive:
            try:
                self._conn.send({"op": "exit"})
                self._proc.wait(5)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


class WorkerPool:
    """The timing worker and ``compile_workers`` compile-only helpers (used on a GPU)."""

    def __init__(self, compile_workers: int = 0):
        self.timer = Worker("timer")
        self.compilers = [Worker(f"compile-{i}") for i in range(compile_workers)]
        self._idle: queue.Queue[Worker] = queue.Queue()
        for w in self.compilers:
            self._idle.put(w)
        self._executor = cf.ThreadPoolExecutor(max(1, compile_workers), thread_name_prefix="autotune-compile")

    def start(self) -> None:
        """Start every process that is not running, all at once (each takes seconds to import)."""
        idle = [w for w in [self.timer, *self.compilers] if not w.alive]
        for w in idle:
            w.spawn()
        for w in idle:
            w.wait_ready()

    def evaluate(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Serve a request in the timing worker."""
        return self.timer.request(msg, timeout)

    def precompile(self, msg: dict[str, Any], timeout: float) -> cf.Future | None:
        """Compile a candidate in the next free helper; None when there are no helpers."""
        if not self.compilers:
            return None
        return self._executor.submit(self._compile, {**msg, "op": "compile"}, timeout)

    def _compile(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        worker = self._idle.get()
        try:
            return worker.request(msg, timeout)
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        for w in [self.timer, *self.compilers]:
            w.close()


_POOL: WorkerPool | None = None
_POOL_LOCK = threading.Lock()


def shared_pool(compile_workers: int) -> WorkerPool:
    """The process-wide pool, kept alive across tuning calls; rebuilt when the helper count changes."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or len(_POOL.compilers) != compile_workers:
            if _POOL is not None:
                _POOL.close()
            _POOL = WorkerPool(compile_workers)
        return _POOL


@atexit.register
def shutdown() -> None:
    """Stop the shared pool's processes (also run at interpreter exit)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.close()
            _POOL = None


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
