"""The batching engine behind `psyche serve` (and the data pipeline's local backend): generation requests
run through `sampler.generate` as rows of one batch per sampling setting, each row with its own seed and
max_tokens; a row leaves when it ends or its request is cancelled.

Requests that share sampling settings (a SamplingParams) run as rows of one batch; a row's
output is what `sampler.generate` gives for it alone (per-row seeds make rows independent of their batch
mates). Left rows stop like finished ones and leave the batch with them (the eager path compacts its KV cache,
the static one rebuckets; see psyche/sampler.py), a batch whose rows have all left ends at
once, and a cancelled request still in the queue is never started. `Engine.run` is synchronous; `Engine.start`
adds a queue and one worker thread that gathers whatever is waiting into one batch, which is how concurrent
HTTP requests get batched (psyche/serve.py). `Engine.stop` lets the running batch finish and fails every request
still queued (STOPPED); a request submitted after it is refused.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from psyche.config import SamplingParams

STOPPED = "the engine stopped before this request ran (the server is shutting down)"


@dataclass
class GenRequest:
    """One prompt, n rows sampled from it. Filled in by the engine; `done` is set when every row ended."""
    prompt: list[int]
    max_tokens: int
    n: int = 1
    sampling: SamplingParams = SamplingParams()
    seed: int = 0  # row j's sampler seed is row_seeds(seed, n)[j]
    on_token: object = None  # optional callback(row j, token id), called from the engine's thread
    tokens: list = field(default_factory=list)  # n lists of token ids (the stop token included)
    finished: list = field(default_factory=list)  # n bools: ended on a stop token
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)  # set by `cancel`: nobody waits for it

    def cancel(self):
        """The client went away: the engine stops this request's rows (or never starts them) and sets `done`."""
        self.cancelled.set()


class Overloaded(RuntimeError):
    pass


class Engine:
    """Batches generation requests through the sampler (see the module docstring)."""

    def __init__(self, model, tokenizer, max_rows: int = 32, max_queue: int = 256, gather_s: float = 0.002):
        self.model, self.tok = model, tokenizer
        self.max_rows, self.gather_s = max_rows, gather_s
        self.max_len = model.config.max_position_embeddings
        self.stop_ids = set(tokenizer.stop_ids)
        self.queue: queue.Queue = queue.Queue(max_queue)
        self.lock = threading.Lock()  # one generate call at a time
        self.calls, self.rows_max = 0, 0  # statistics: sampler batches, most rows in one batch
        self.cancelled, self.rows_freed = 0, 0  # cancelled requests; rows that left a batch before their end
        self._thread = None
        self._pending: list[GenRequest] = []  # gathered but left for the next batch (the worker's own)
        self._stopping = threading.Event()
        self._submit_lock = threading.Lock()  # no submit lands in the queue once stop has begun

    # ---- synchronous core ----
    def run(self, requests: list[GenRequest]):
        """Generate every request (blocking). Requests are grouped by sampling settings and split so that each
        batch has at most max_rows rows and fits the context: longest prompt + largest max_tokens <= max_len."""
        groups: dict[tuple, list[GenRequest]] = {}
        for r in requests:
            r.tokens, r.finished = [[] for _ in range(r.n)], [False] * r.n
            if r.cancelled.is_set():  # its client left while it waited: never started
                self.cancelled += 1
                r.done.set()
                continue
            if len(r.prompt) + r.max_tokens > self.max_len or not r.prompt or r.max_tokens < 1:
                self._fail(r, f"prompt ({len(r.prompt)}) + max_tokens ({r.max_tokens}) does not fit the context "
                              f"({self.max_len})")
                continue
            groups.setdefault(r.sampling, []).append(r)
        for reqs in groups.values():
            batch, longest, most = [], 0, 0
            for r in sorted(reqs, key=lambda r: len(r.prompt)):
                lo, mo = max(longest, len(r.prompt)), max(most, r.max_tokens)
                if batch and (lo + mo > self.max_len or sum(b.n for b in batch) + r.n > self.max_rows):
                    self._generate(batch)
                    batch, lo, mo = [], len(r.prompt), r.max_tokens
                batch.append(r)
                longest, most = lo, mo
            if batch:
                self._generate(batch)

    def _generate(self, batch: list[GenRequest]):
        import torch

        owner = [(r, j) for r in batch for j in range(r.n)]  # row -> (request, sample index)
        try:
            with self.lock, torch.no_grad():
                self.calls += 1
                self.rows_max = max(self.rows_max, len(owner))
                self._decode(batch, owner)
        except Exception as e:  # a failed batch fails its requests, not the engine
            for r in batch:
                if not r.done.is_set():
                    self._fail(r, f"generation failed: {type(e).__name__}: {e}")
        for r in batch:
            r.done.set()

    def _decode(self, batch: list[GenRequest], owner: list[tuple]):
        """One `sampler.generate` call over the rows `owner`: each row ends at its stop token, at its own
        max_tokens or when its request is cancelled (a client that disconnected), and leaves the batch with the
        finished ones (at the sampler's next compaction or rebucketing); a request is done when all its rows
        have ended."""
        import torch

        from psyche.sampler import generate, row_seeds

        seeds = torch.cat([row_seeds(r.seed, r.n) for r in batch])
        limits = torch.tensor([r.max_tokens for r, _ in owner])
        left = {id(r): r.n for r in batch}  # rows still running, per request
        ended = [False] * len(owner)

        def end(i):
            ended[i] = True
            r, j = owner[i]
            if r.cancelled.is_set() and not (r.finished[j] or len(r.tokens[j]) >= r.max_tokens):
                self.rows_freed += 1
            left[id(r)] -= 1
            if left[id(r)] == 0:
                if r.cancelled.is_set():
                    self.cancelled += 1
                r.done.set()

        def on_token(step, rows, toks):
            for i, token in zip(rows.tolist(), toks.tolist()):
                r, j = owner[i]
                r.tokens[j].append(token)
                r.finished[j] = token in self.stop_ids
                if r.on_token is not None:
                    r.on_token(j, token)
                if r.finished[j] or len(r.tokens[j]) >= r.max_tokens:
                    end(i)

        def should_end(rows):
            out = []
            for i in rows.tolist():
                gone = not ended[i] and owner[i][0].cancelled.is_set()
                if gone:
                    end(i)
                out.append(gone)
            return out

        generate(self.model, [r.prompt for r, _ in owner], max_new_tokens=int(limits.max()),
                 sampling=batch[0].sampling, stop_token_ids=sorted(self.stop_ids), pad_id=self.tok.pad_id,
                 seed=seeds, on_token=on_token, row_max_tokens=limits, should_end=should_end)

    @staticmethod
    def _fail(r: GenRequest, msg: str):
        r.error = msg
        r.done.set()

    # ---- threaded front ----
    def start(self):
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="psyche-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """End the worker: the batch it is running finishes; every request still queued fails with STOPPED, and
        a later submit is refused (Overloaded)."""
        with self._submit_lock:
            self._stopping.set()
        try:
            self.queue.put_nowait(None)  # wakes a worker waiting for work
        except queue.Full:
            pass  # the worker is not waiting (the queue holds work), and it reads the flag before it waits again
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._fail_queued()

    def submit(self, r: GenRequest) -> GenRequest:
        """Queue a request for the worker thread; raises Overloaded when the queue is full or the engine is
        stopping."""
        with self._submit_lock:
            if self._stopping.is_set():
                raise Overloaded("the server is shutting down")
            try:
                self.queue.put_nowait(r)
            except queue.Full:
                raise Overloaded("the server is busy (request queue full); retry later") from None
        return r

    def _fail_queued(self):
        """Fail every request left in the queue with STOPPED (the None wake-ups are dropped)."""
        while True:
            try:
                r = self.queue.get_nowait()
            except queue.Empty:
                return
            if r is not None:
                self._fail(r, STOPPED)

    def _loop(self):
        while not self._stopping.is_set():
            batch = self._pending
            self._pending = []
            if not batch:
                r = self.queue.get()
                if r is None:  # stop's wake-up: the flag is set
                    continue
                batch = [r]
                time.sleep(self.gather_s)  # let requests that arrive together share the batch
            rows = sum(r.n for r in batch)
            while rows < self.max_rows:
                try:
                    r = self.queue.get_nowait()
                except queue.Empty:
                    break
                if r is None:  # stop's wake-up: run what was gathered, then end
                    break
                if r.cancelled.is_set():  # its client left while it waited
                    self.cancelled += 1
                    r.done.set()
                    continue
                if rows + r.n > self.max_rows:
                    self._pending.append(r)
                    break
                batch.append(r)
                rows += r.n
            try:
                self.run(batch)
            except Exception as e:  # never let one bad batch end the worker
                for r in batch:
                    if not r.done.is_set():
                        self._fail(r, f"{type(e).__name__}: {e}")
        for r in self._pending:
            self._fail(r, STOPPED)
        self._pending = []
        self._fail_queued()
