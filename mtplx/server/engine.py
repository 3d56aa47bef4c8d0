"""The server's narrow view of the model: a `ModelAdapter`, and the `Engine` that owns it.

The Engine owns one model, a bounded FIFO of waiting requests and ONE worker thread. Only the
worker thread ever touches the model or a session. Up to `parallel` generations are active at
once, each with its own session (caches never mix):
- batched (an adapter with `new_generation`, the real model): a `BatchRunner` steps them
  together - one prefill block of a newcomer, then one cycle of every running generation with
  all their verify rows in one forward (mtplx/decoding/batch.py); each output stays the one it
  would be alone;
- interleaved (any other adapter, e.g. the fake): one `next()` (one cycle) of each in turn.
A cancelled job (client gone) leaves at the next step, which frees its session.

Results reach the asyncio side through a per-job `asyncio.Queue` fed with
`loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from mtplx.decoding.params import SamplingParams

log = logging.getLogger("mtplx.server")


@dataclass
class GenStats:
    """Running stats of one request (cumulative)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, restored from the prefix cache
    cache_write_tokens: int = 0  # of prompt_tokens, added to the prefix cache
    batch_size_sum: int = 0  # over cycles: the requests sharing that cycle's forward
    generated_tokens: int = 0
    prompt_s: float = 0.0  # prefill + first token
    decode_s: float = 0.0  # everything after the first token
    depth: int = 0
    cycles: int = 0  # verify passes after the first token
    drafted_by_depth: list[int] = field(default_factory=list)  # [D]: drafts proposed at draft position k
    accepted_by_depth: list[int] = field(default_factory=list)  # [D]: of those, accepted

    @property
    def draft_n(self) -> int:
        return sum(self.drafted_by_depth)

    @property
    def draft_n_accepted(self) -> int:
        return sum(self.accepted_by_depth)


@dataclass
class GenStep:
    """One step reported by a generation (usually one decoding cycle)."""

    text: str  # new text (already stop-filtered)
    token_ids: list[int]
    finish_reason: str | None = None  # None while running, then "stop" | "length"
    stop_sequence: str | None = None  # the stop string that ended it, if any
    stats: GenStats | None = None
    logprobs: list | None = None  # per token (id, logprob, [(id, logprob)] top), when asked
    prompt_logprobs: list | None = None  # the first step, with echo: per prompt token after the first


class ModelAdapter(Protocol):
    model_id: str
    max_context: int
    chat_template: str | None  # the Jinja chat template (its text tells the tool-call format)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None, **template_kwargs) -> str:
        """Render messages with the chat template, assistant turn opened (extra template variables in
        `template_kwargs`, e.g. enable_thinking)."""

    def encode_chat(self, text: str) -> list[int]:
        """Tokenize a rendered chat prompt (its special tokens are in the text)."""

    def encode(self, text: str) -> list[int]:
        """Tokenize raw text (completions)."""

    def generate(self, prompt_ids: list[int], params: SamplingParams, depth: int) -> Iterator[GenStep]:
        """Generate; the last step carries finish_reason. Runs only in the worker thread."""

    # Optional, for batching (MtplxModelAdapter): new_generation(prompt_ids, params, depth) ->
    # mtplx.decoding.loop.Generation, and gen_step(GenerationStep) -> GenStep.


class QueueFull(Exception):
    pass


class EngineClosed(Exception):
    pass


# events placed on a job's asyncio queue
@dataclass
class StepEvent:
    step: GenStep


@dataclass
class DoneEvent:
    finish_reason: str  # "stop" | "length" | "cancelled"
    stop_sequence: str | None
    stats: GenStats


@dataclass
class ErrorEvent:
    message: str


class Job:
    _ids = 0
    _ids_lock = threading.Lock()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop,
                 on_cancel: Callable[["Job"], None] | None = None):
        with Job._ids_lock:
            Job._ids += 1
            self.id = Job._ids
        self.prompt_ids = prompt_ids
        self.params = params
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.gen: Iterator[GenStep] | None = None
        self.stats = GenStats(prompt_tokens=len(prompt_ids))
        self.enqueued_at = time.perf_counter()
        self.finished = False
        self._on_cancel = on_cancel

    def cancel(self) -> None:
        """Stop this generation (client gone): dropped from the queue now, or closed at its next turn."""
        if self.cancelled.is_set() or self.finished:
            return
        self.cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel(self)

    def _push(self, ev: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, ev)
        except RuntimeError:  # loop closed: nobody is listening any more
            self.cancelled.set()


class Engine:
    def __init__(
        self,
        model: ModelAdapter,
        depth: int = 0,
        max_queue: int = 16,
        parallel: int = 1,
        on_finish: Callable[[Job, str], None] | None = None,
    ):
        self.model = model
        self.depth = depth
        self.max_queue = max_queue
        self.parallel = max(1, parallel)
        self.on_finish = on_finish
        self.on_step: Callable[[Any], None] | None = None  # BatchRunner StepReport per batched step
        self.runner = None
        if hasattr(model, "new_generation"):
            from mtplx.decoding.batch import BatchRunner

            self.runner = BatchRunner(max_batch=self.parallel)
        self._waiting: collections.deque[Job] = collections.deque()
        self._active: list[Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # --- public -------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_count(self) -> int:
        return len(self._active)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mtplx-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            for job in list(self._waiting) + list(self._active):
                job.cancel()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Job:
        """Queue a generation; raises QueueFull when the waiting queue is at its bound."""
        job = Job(prompt_ids, params, asyncio.get_running_loop(), on_cancel=self._drop_waiting)
        with self._cond:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            # a request that can start at once never counts as queued
            free = self.parallel - len(self._active) - len(self._waiting)
            if free <= 0 and len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (max {self.max_queue})")
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    def _drop_waiting(self, job: Job) -> None:
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return  # already running (the worker closes it) or gone
        self._finish(job, DoneEvent("cancelled", None, job.stats), "cancelled")

    # --- worker thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._active:
                    self._cond.wait()
                if self._closed and not self._active and not self._waiting:
                    return
                while self._waiting and len(self._active) < self.parallel:
                    job = self._waiting.popleft()
                    if job.cancelled.is_set():
                        self._finish(job, DoneEvent("cancelled", None, job.stats), "cancelled")
                        continue
                    self._active.append(job)
                active = list(self._active)
            if self.runner is not None:
                self._batched_step(active)
            else:
                for job in active:
                    self._turn(job)
            with self._cond:
                self._active = [j for j in self._active if not j.finished]

    def _finish(self, job: Job, ev: Any, outcome: str) -> None:
        job.finished = True
        if self.runner is not None:
            if job.gen is not None:  # only the worker thread admits jobs: a waiting one has none
                self.runner.remove(job.id)
            job.gen = None  # a Generation: dropping it frees its session
        if job.gen is not None:
            try:
                job.gen.close()  # frees the session in this thread
            except Exception:  # pragma: no cover - defensive
                log.exception("closing generation %d", job.id)
        job._push(ev)
        if self.on_finish is not None:
            try:
                self.on_finish(job, outcome)
            except Exception:  # pragma: no cover
                log.exception("on_finish hook")

    def _batched_step(self, active: list[Job]) -> None:
        runner, by_id = self.runner, {}
        for job in active:
            by_id[job.id] = job
            if job.cancelled.is_set():
                runner.remove(job.id)
                self._finish(job, DoneEvent("cancelled", None, job.stats), "cancelled")
            elif job.gen is None:  # newly admitted: its Generation joins the batch
                try:
                    job.gen = self.model.new_generation(job.prompt_ids, job.params, self.depth)
                except Exception as e:  # noqa: BLE001 - a request the model refuses: its own error
                    log.exception("generation %d could not start", job.id)
                    self._finish(job, ErrorEvent(f"generation failed: {type(e).__name__}"), "error")
                    continue
                runner.add(job.id, job.gen)
        if not len(runner):
            return
        try:
            steps = runner.step()
        except Exception as e:  # the model failed: every job of the batch gets the error, serving goes on
            log.exception("batched step failed")
            for job in active:
                if not job.finished:
                    runner.remove(job.id)
                    self._finish(job, ErrorEvent(f"generation failed: {type(e).__name__}"), "error")
            return
        if self.on_step is not None:
            try:
                self.on_step(runner.last)
            except Exception:  # pragma: no cover
                log.exception("on_step hook")
        merged: dict[int, GenStep] = {}  # a job's tokens of this step reach its client as one event
        for jid, st in steps:
            step = self.model.gen_step(st)
            prev = merged.get(jid)
            if prev is not None:
                lps = None if step.logprobs is None else (prev.logprobs or []) + step.logprobs
                step = GenStep(prev.text + step.text, prev.token_ids + step.token_ids, step.finish_reason,
                               step.stop_sequence, step.stats, lps, prev.prompt_logprobs or step.prompt_logprobs)
            merged[jid] = step
        for jid, step in merged.items():
            job = by_id[jid]
            if job.finished:
                continue
            job.stats = step.stats
            if step.text or step.token_ids:
                job._push(StepEvent(step))
            if step.finish_reason is not None:
                self._finish(job, DoneEvent(step.finish_reason, step.stop_sequence, job.stats), step.finish_reason)

    def _turn(self, job: Job) -> None:
        if job.cancelled.is_set():
            self._finish(job, DoneEvent("cancelled", None, job.stats), "cancelled")
            return
        try:
            if job.gen is None:
                job.gen = iter(self.model.generate(job.prompt_ids, job.params, self.depth))
            step = next(job.gen)
        except StopIteration:
            self._finish(job, DoneEvent("stop", None, job.stats), "stop")
            return
        except Exception as e:  # the model failed: report without a trace, keep serving
            log.exception("generation %d failed", job.id)
            job.gen = None
            self._finish(job, ErrorEvent(f"generation failed: {type(e).__name__}"), "error")
            return
        if step.stats is not None:
            job.stats = step.stats
        if step.text or step.token_ids:
            job._push(StepEvent(step))
        if step.finish_reason is not None:
            self._finish(job, DoneEvent(step.finish_reason, step.stop_sequence, job.stats), step.finish_reason)
