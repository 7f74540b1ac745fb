"""Env pools: N env slots that the rollout engine (:mod:`vla.envs.rollout`) resets and steps.

A pool holds one environment per *slot*; each slot can run any task of one family (it keeps the
envs of its last few tasks, since making a MetaWorld env costs ~0.2-1 s and each holds a GL
context). Both pools answer the same three calls:

- ``reset({slot: (task, seed)}) -> {slot: (obs, info) | None}``
- ``step({slot: action}) -> {slot: (obs, reward, terminated, truncated, info) | None}``, also
  split in two: ``send({slot: action})`` then ``receive(wait_all)`` (all results, or with
  ``wait_all=False`` whichever are ready, so fast workers need not wait for slow ones); both take
  ``images={slot: False}`` for steps whose observation nobody will read: envs with an
  ``observe_images`` attribute (tabletop, MetaWorld) then skip rendering and return only ``state``
- ``restart(slot) -> bool`` after a slot came back ``None``

``InProcessPool`` runs the envs in this process (``workers=0``, tests, debugging).
``ProcessPool`` runs one spawned worker per slot (``spawn``: a forked child would inherit the
parent's GL state and crash on its first render). Each worker answers on its own pipe, so a worker
killed at any moment, even halfway through sending a reply, can only cut its own pipe short: the
pool reads that as end-of-file and answers ``None`` for the slot (the worker is lost) instead of
hanging. The caller decides what happens to the episode that was running there.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import traceback
from collections import OrderedDict
from typing import Any

import numpy as np

StepResult = tuple[dict, float, bool, bool, dict]  # (obs, reward, terminated, truncated, info)


def _wants_images(images: dict[int, bool] | None, slot: int) -> bool:
    """Whether ``slot``'s next observation is to be rendered (``images`` omitted or silent: yes)."""
    return True if images is None else bool(images.get(slot, True))


class _TaskEnvs:
    """The envs of one slot, one per task, keeping the ``keep`` most recently used."""

    def __init__(self, family: str, env_kwargs: dict[str, Any], keep: int = 2) -> None:
        self.family = family
        self.env_kwargs = dict(env_kwargs)
        self.keep = keep
        self._envs: OrderedDict[str, Any] = OrderedDict()
        self.current: Any = None

    def reset(self, task: str, seed: int) -> tuple[dict, dict]:
        from vla.envs.registry import make_env

        if task not in self._envs:
            self._envs[task] = make_env(self.family, task, **self.env_kwargs)
            while len(self._envs) > self.keep:
                _, old = self._envs.popitem(last=False)
                old.close()
        self._envs.move_to_end(task)
        self.current = self._envs[task]
        return self.current.reset(seed=int(seed))

    def step(self, action: np.ndarray, images: bool = True) -> StepResult:
        """One step; ``images=False`` asks an env that supports it (``observe_images``) not to render."""
        if self.current is None:
            raise RuntimeError("env pool: step before reset")
        if hasattr(self.current, "observe_images"):
            self.current.observe_images = bool(images)
        obs, reward, terminated, truncated, info = self.current.step(action)
        return obs, float(reward), bool(terminated), bool(truncated), info

    def close(self) -> None:
        for env in self._envs.values():
            with contextlib.suppress(Exception):
                env.close()
        self._envs.clear()
        self.current = None


class InProcessPool:
    """``n`` slots stepped one after another in this process."""

    def __init__(self, family: str, n: int, env_kwargs: dict[str, Any] | None = None) -> None:
        if n < 1:
            raise ValueError(f"InProcessPool: expected n >= 1 slots, got {n}")
        self.family = family
        self.n = n
        self._slots = [_TaskEnvs(family, env_kwargs or {}) for _ in range(n)]
        self._sent: dict[int, tuple[np.ndarray, bool]] = {}

    def reset(self, jobs: dict[int, tuple[str, int]]) -> dict[int, tuple[dict, dict] | None]:
        return {i: self._slots[i].reset(task, seed) for i, (task, seed) in jobs.items()}

    def step(self, actions: dict[int, np.ndarray], images: dict[int, bool] | None = None
             ) -> dict[int, StepResult | None]:
        self.send(actions, images)
        return self.receive()

    def send(self, actions: dict[int, np.ndarray], images: dict[int, bool] | None = None) -> None:
        """Queue one step per slot; ``images[slot]=False``: that step's observation need not be rendered."""
        self._sent.update({i: (a, _wants_images(images, i)) for i, a in actions.items()})

    def receive(self, wait_all: bool = True) -> dict[int, StepResult | None]:
        sent, self._sent = self._sent, {}
        return {i: self._slots[i].step(a, img) for i, (a, img) in sent.items()}

    def restart(self, slot: int) -> bool:
        return False  # an in-process env never goes missing

    def env(self, slot: int = 0) -> Any:
        """The env ``slot`` last reset (to read its attributes, e.g. ``max_episode_steps``)."""
        return self._slots[slot].current

    def close(self) -> None:
        for s in self._slots:
            s.close()

    def __enter__(self) -> InProcessPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _worker_main(family: str, env_kwargs: dict[str, Any], conn) -> None:
    # The main process handles Ctrl-C and closes the pool; a worker ignores SIGINT so an interrupt
    # never kills it halfway through a reply.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    envs = _TaskEnvs(family, env_kwargs)
    try:
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the main process went away
                break
            if msg[0] == "close":
                break
            try:
                reply = envs.reset(*msg[1]) if msg[0] == "reset" else envs.step(*msg[1:])
                conn.send(("ok", reply))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        envs.close()
        conn.close()


class WorkerError(RuntimeError):
    """An env raised inside a pool worker (the worker's traceback is in the message)."""


class ProcessPool:
    """``n`` slots, one spawned worker process each; a dead worker reads as ``None`` for its slot."""

    def __init__(self, family: str, n: int, env_kwargs: dict[str, Any] | None = None,
                 max_restarts: int | None = None) -> None:
        import multiprocessing as mp

        if n < 1:
            raise ValueError(f"ProcessPool: expected n >= 1 slots, got {n}")
        self.family = family
        self.n = n
        self.env_kwargs = dict(env_kwargs or {})
        self.max_restarts = n if max_restarts is None else int(max_restarts)
        self.restarts = 0
        self.lost: list[tuple[int, int | None]] = []  # (slot, exit code) of every worker lost
        self._ctx = mp.get_context("spawn")
        self._procs: list[Any] = [None] * n
        self._conns: list[Any] = [None] * n
        self._jobs: dict[int, tuple[str, int]] = {}  # the (task, seed) each slot last reset to
        self._waiting: dict[Any, int] = {}  # connection -> slot, for every message not answered yet
        self._gone: set[int] = set()  # slots whose worker was lost while sending; answered None next
        self._start(list(range(n)))

    @property
    def pids(self) -> list[int | None]:
        """The worker process ids (``None`` for a slot whose worker is gone)."""
        return [p.pid if p is not None and p.is_alive() else None for p in self._procs]

    def _start(self, slots: list[int]) -> None:
        # Workers inherit SIGINT=ignored from the moment they start (a spawned child keeps ignored
        # signals across exec), so a Ctrl-C during their start-up cannot kill them either.
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
        try:
            for i in slots:
                parent, child = self._ctx.Pipe(duplex=True)
                proc = self._ctx.Process(target=_worker_main, args=(self.family, self.env_kwargs, child), daemon=True)
                proc.start()
                child.close()  # the worker now holds the only other end: its death reads as EOF here
                self._procs[i], self._conns[i] = proc, parent
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)

    def _send(self, messages: dict[int, tuple]) -> None:
        """Send one message per slot; the replies are collected by :meth:`_receive`."""
        for i, msg in messages.items():
            conn = self._conns[i]
            if conn is None:
                self._gone.add(i)
                continue
            try:
                conn.send(msg)
                self._waiting[conn] = i
            except (BrokenPipeError, ConnectionResetError, OSError):
                self._lose(i)
                self._gone.add(i)

    def _receive(self, slots: set[int] | None = None, wait_all: bool = True) -> dict[int, Any]:
        """Replies of the slots in ``slots`` (default: every slot awaited): all of them, or with
        ``wait_all=False`` those ready once at least one is. A lost worker answers ``None``."""
        from multiprocessing.connection import wait

        replies: dict[int, Any] = {i: None for i in self._gone if slots is None or i in slots}
        self._gone -= set(replies)
        waiting = {c: i for c, i in self._waiting.items() if slots is None or i in slots}
        while waiting and (wait_all or not replies):
            ready = wait(list(waiting), timeout=1.0)
            if not ready:  # nothing within a second: look for workers that died without closing cleanly
                for conn, i in list(waiting.items()):
                    if not self._procs[i].is_alive():
                        del waiting[conn], self._waiting[conn]
                        self._lose(i)
                        replies[i] = None
                continue
            for conn in ready:
                i = waiting.pop(conn)
                del self._waiting[conn]
                try:
                    status, payload = conn.recv()
                except (EOFError, OSError):  # the worker is gone, possibly halfway through a reply
                    self._lose(i)
                    replies[i] = None
                    continue
                if status == "error":
                    task, seed = self._jobs.get(i, ("?", -1))
                    raise WorkerError(f"env pool worker {i} ({self.family}/{task} seed {seed}) failed:\n{payload}")
                replies[i] = payload
        return replies

    def _lose(self, i: int) -> None:
        proc, conn = self._procs[i], self._conns[i]
        if proc is None:
            return
        _stop(proc, conn, timeout=1.0)
        self._waiting.pop(conn, None)
        self.lost.append((i, proc.exitcode))
        self._procs[i], self._conns[i] = None, None

    def reset(self, jobs: dict[int, tuple[str, int]]) -> dict[int, tuple[dict, dict] | None]:
        self._jobs.update({i: (str(t), int(s)) for i, (t, s) in jobs.items()})
        self._send({i: ("reset", (str(t), int(s))) for i, (t, s) in jobs.items()})
        return self._receive(set(jobs))

    def send(self, actions: dict[int, np.ndarray], images: dict[int, bool] | None = None) -> None:
        """Start one step in each slot of ``actions``; :meth:`receive` collects the results.
        ``images[slot]=False``: that step's observation need not be rendered (nobody reads it)."""
        self._send({i: ("step", np.asarray(a, np.float32), _wants_images(images, i)) for i, a in actions.items()})

    def receive(self, wait_all: bool = True) -> dict[int, StepResult | None]:
        """Results of the steps sent: all of them, or (``wait_all=False``) whichever are ready,
        at least one, so fast workers need not wait for slow ones."""
        return self._receive(None, wait_all)

    def step(self, actions: dict[int, np.ndarray], images: dict[int, bool] | None = None
             ) -> dict[int, StepResult | None]:
        self.send(actions, images)
        return self._receive(set(actions))

    def restart(self, slot: int) -> bool:
        """Start a fresh worker in ``slot`` after its worker was lost; False once restarts are used up."""
        if self._procs[slot] is not None:
            return True
        if self.restarts >= self.max_restarts:
            return False
        self.restarts += 1
        self._start([slot])
        return True

    def close(self) -> None:
        for conn in self._conns:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.send(("close",))
        for i, proc in enumerate(self._procs):
            if proc is None:
                continue
            _stop(proc, self._conns[i], timeout=2.0)
            self._procs[i], self._conns[i] = None, None

    def __enter__(self) -> ProcessPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_pool(family: str, n: int, env_kwargs: dict[str, Any] | None = None, workers: bool = True):
    """A :class:`ProcessPool` of ``n`` workers, or an :class:`InProcessPool` when ``workers`` is False."""
    return ProcessPool(family, n, env_kwargs) if workers else InProcessPool(family, n, env_kwargs)


def _stop(proc, conn, timeout: float) -> None:
    """Wait up to ``timeout`` for a worker to exit, terminate it if it has not, and close its pipe."""
    proc.join(timeout=timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout=timeout)
    with contextlib.suppress(Exception):
        conn.close()
