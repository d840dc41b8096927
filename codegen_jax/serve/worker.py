"""The engine's thread: it owns the continuous-batching `Scheduler` (which is not thread-safe) and runs
rounds of admit + decode while there is work; HTTP handlers hand it rows and cancellations through a
queue and get text pieces and results back through their own callbacks.

Capacity: at most `slots` rows decode at once and `max_queue` more may wait; beyond that `submit`
raises `Busy` (the app answers 429). Stopping drains: waiting and running rows finish first, up to a
deadline, then the rest are cancelled.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from codegen_jax.sample import Generator
from codegen_jax.sample.scheduler import Request, Result, Scheduler


class Busy(Exception):
    """More rows than the slots and the queue hold."""


class Worker:
    def __init__(self, gen: Generator, slots: int = 16, max_queue: int = 64, chunk: int = 8,
                 precompile: bool = False, batch_invariant: bool = False):
        # the whole context per slot and one prompt per prefill: a request's prefill has the same shape
        # whatever arrives with it, so concurrent results equal results alone; with `precompile` every
        # decode bucket compiles the first time a sampling mode is seen (the warm-up), so no later mix
        # of requests in that mode compiles; `batch_invariant` fixes the decode shapes (every slot, the
        # whole context), so results are bitwise those of the request alone
        self.scheduler = Scheduler(gen.engine, gen.tokenizer, slots, refill=True, chunk=chunk,
                                   min_capacity=gen.model_cfg.max_seq_len, max_group=1, open_queue=True,
                                   precompile=precompile, fixed_shapes=batch_invariant)
        self.slots, self.max_queue = self.scheduler.slots, max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[int, Callable[[Result], None]] = {}  # id(request) -> result callback
        self._outstanding = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, drain_s: float = 30.0) -> None:
        """Let the work in hand finish (at most `drain_s`), then end the thread."""
        deadline = time.monotonic() + drain_s
        while self.outstanding and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=10)

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def submit(self, requests: list[Request], on_result: Callable[[Result], None]) -> None:
        """Queue rows (their `on_text` and `on_result` are called from the engine thread)."""
        with self._lock:
            if self._stop.is_set() or self.error is not None:
                raise Busy("the server is shutting down")
            if self._outstanding + len(requests) > self.slots + self.max_queue:
                raise Busy(f"{self._outstanding} rows are running or queued ({self.slots} slots, "
                           f"{self.max_queue} queued at most)")
            self._outstanding += len(requests)
            for r in requests:
                self._sinks[id(r)] = on_result
            # under the lock: once the engine thread has failed (and drained the inbox) nothing more arrives
            self._inbox.put(("submit", requests))

    def cancel(self, tag: Any) -> None:
        """End the rows tagged `tag` (their results still arrive, finish_reason "cancelled")."""
        self._inbox.put(("cancel", tag))

    def stats(self) -> dict[str, Any]:
        sched = self.scheduler
        return {"slots": self.slots, "active": len(sched.rows), "waiting": len(sched.waiting),
                "outstanding": self._outstanding, "compiles": sched.engine.compiles,
                "generated_tokens": sched.stats["new_tokens"]}

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            kind, payload = item
            if kind == "submit":
                for r in payload:
                    self.scheduler.submit(r)
            else:
                for result in self.scheduler.cancel(payload):
                    self._deliver(result)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain(block=not self.scheduler.busy)
                if self.scheduler.busy:
                    for result in self.scheduler.step():
                        self._deliver(result)
        except BaseException as e:  # noqa: BLE001 - reported to every waiting client as a 503
            with self._lock:
                self.error = e
            pending = [row.request for row in self.scheduler.rows.values()] + list(self.scheduler.waiting)
            while True:  # and the rows submitted but not yet taken from the inbox
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item is not None and item[0] == "submit":
                    pending += item[1]
            for r in pending:
                self._deliver(Result(r, "", [], "error"))
            raise

    def _deliver(self, result: Result) -> None:
        with self._lock:
            self._outstanding -= 1
        sink = self._sinks.pop(id(result.request), None)
        if sink is not None:
            sink(result)
