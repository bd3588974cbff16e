"""The worker: one thread owns the backend and runs admitted requests one at a time, in order.

A backend holds one KV cache and is not thread-safe, so it is loaded once and driven by a single
thread; the event loop never runs model code, tokenisation or detokenisation:

- **Admission** (``reserve``): at most ``max_queue`` requests wait behind the one generating; a
  request past that gets 429 with a ``Retry-After`` estimated from recent job durations.  A slot is
  held from before tokenisation until the request ends, so a flood of large prompts is bounded too.
- **Tokenisation** (``encode``) runs on one separate thread, serially (a fast tokenizer may not be
  shared by concurrent encoders), so a megabyte prompt never blocks the event loop.
- **Detokenisation** happens on the worker thread, step by step (``TextStream``), which also finds
  stop strings there and ends the generation at once.
- **Cancellation**: a job whose request ended (client gone, stop string, error) is marked
  cancelled; the worker checks after every decoding step, so it stops within one step, and skips a
  cancelled job still waiting in the queue.
"""
from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..core.backends import BackendError
from ..core.config import GenerationConfig
from ..core.engine import Step
from ..core.text import TextStream
from .schemas import APIError

log = logging.getLogger("medusa.serve")

_DONE = object()


@dataclass(frozen=True)
class Delta:
    """What one decoding step means to the client: new text (maybe empty) and why it ended, if it did."""

    text: str
    step: Step
    finish_reason: Optional[str]  # "stop" (stop id or stop string), "length", None while generating


class GenerationError(Exception):
    """The backend failed on a job (the original exception is the ``__cause__``); the worker goes on."""


class Slot:
    """One admitted request; ``release`` (idempotent, on the event loop) frees it."""

    def __init__(self, on_release: Callable[[], None]) -> None:
        self._on_release: Optional[Callable[[], None]] = on_release

    def release(self) -> None:
        if self._on_release is not None:
            self._on_release, release = None, self._on_release
            release()


@dataclass(eq=False)
class Job:
    """One generation: the worker pushes Deltas, then an exception or _DONE, into ``events``."""

    ids: list[int]
    cfg: GenerationConfig
    text: TextStream
    slot: Slot
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, item: Any) -> None:
        """Called by the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop has closed (server shutting down): nobody is listening
            self.cancelled.set()

    def close(self) -> None:
        """The request is over (finished, failed, or its client left): stop generating, free the slot."""
        self.cancelled.set()
        self.slot.release()

    async def next(self) -> Optional[Delta]:
        """The next step's Delta; None once the job is over; raises GenerationError if it failed."""
        item = await self.events.get()
        if item is _DONE or isinstance(item, GenerationError):
            self.close()
        if isinstance(item, GenerationError):
            raise item
        return None if item is _DONE else item


class Worker:
    """Owns the backend: admits requests, tokenises them, runs their generations one at a time."""

    def __init__(self, backend: Any, max_queue: int) -> None:
        self.backend = backend
        self.capacity = max_queue + 1  # waiting requests + the one generating
        self.active = 0  # admitted requests; read and written on the event loop only
        self.seconds_per_job = 1.0  # moving average, for Retry-After; written by the worker thread
        self._jobs: queue.SimpleQueue[Optional[Job]] = queue.SimpleQueue()
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="medusa-tokenize")
        self._thread = threading.Thread(target=self._loop, name="medusa-worker", daemon=True)
        self._thread.start()

    def reserve(self) -> Slot:
        """A slot for one request, or 429 when ``max_queue`` requests already wait."""
        if self.active >= self.capacity:
            wait = max(1, math.ceil(self.seconds_per_job))  # when the running job should free a slot
            raise APIError(429, f"the server is busy: {self.capacity - 1} requests are already waiting; "
                                f"retry in {wait} s", code="queue_full", kind="rate_limit_error",
                           headers={"Retry-After": str(wait)})
        self.active += 1
        return Slot(self._release)

    def _release(self) -> None:
        self.active -= 1

    async def encode(self, encode: Callable[..., list[int]], *args: Any) -> list[int]:
        """Run ``encode(*args)`` on the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._encoder, encode, *args)

    def submit(self, slot: Slot, ids: list[int], cfg: GenerationConfig, text: TextStream) -> Job:
        job = Job(ids, cfg, text, slot, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def stop(self) -> None:
        self._jobs.put(None)
        self._encoder.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            if not job.cancelled.is_set():
                started = time.perf_counter()
                self._run(job)
                self.seconds_per_job = 0.8 * self.seconds_per_job + 0.2 * (time.perf_counter() - started)
            job.put(_DONE)

    def _run(self, job: Job) -> None:
        steps = None
        try:
            steps = self.backend.generate(job.ids, job.cfg)
            for step in steps:
                delta = _delta(job.text, step)
                job.put(delta)
                if delta.finish_reason or job.cancelled.is_set():
                    break
            self.backend.synchronize()
        except Exception as err:  # reported to this request; the worker serves the next one
            if not isinstance(err, BackendError):  # an option this backend refuses is the client's error
                log.exception("generation failed")
            failure = GenerationError(f"{type(err).__name__}: {err}")
            failure.__cause__ = err
            job.put(failure)
        finally:
            close = getattr(steps, "close", None)
            if close is not None:  # end the engine's generator now, not whenever it is collected
                close()


def _delta(text: TextStream, step: Step) -> Delta:
    new = text.push(step.tokens)
    if text.stopped:
        return Delta(new, step, "stop")
    if step.finish_reason:
        new += text.flush()
    return Delta(new, step, step.finish_reason)
