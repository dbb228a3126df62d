"""LLM backends for the data pipeline, behind one small interface.

    backend.complete(messages_batch, temperature=0.7, top_p=0.9, max_tokens=512, seeds=None) -> list

Every backend takes a batch of chat-message lists and returns one entry per conversation, in order: the reply
text (str), or a `Failure` saying why there is none. A failure belongs to its item only; the step records it
and goes on. An exception out of `complete` is not a per-item failure: it stops the step (which can be
rerun; see io.py).

- `LocalBackend`: a psyche checkpoint through the KV-cache sampler (via serve.Engine): prompts are batched,
  each has its own seed, so a reply does not depend on its batch mates (temperature 0 = greedy).
- `OpenAIBackend`: any OpenAI-compatible chat-completions endpoint over HTTP (`psyche serve`, vLLM, a hosted
  API). Bounded concurrency; timeouts, connection errors, 5xx and 429 are retried with exponential backoff
  (backoff * 2**attempt seconds), then reported as a Failure; other 4xx fail at once with the server's message.
- `CallableBackend`: a Python function (messages, seed) -> str, for rule-based or scripted replies.

Seeds: `seeds[i]` is request i's sampling seed; steps derive it from the item and the purpose of the call
(`stable_seed`), so a rerun asks the same question with the same seed.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Failure:
    """No reply for this request, and why."""
    reason: str

    def __str__(self):
        return self.reason


def stable_seed(*parts) -> int:
    """A seed (0 <= s < 2**62) from any JSON-able parts, stable across runs and machines."""
    h = hashlib.sha1(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode()).hexdigest()
    return int(h[:15], 16)


class Backend:
    """The interface. Subclasses implement `complete`; `name` labels the backend in records and summaries."""
    name = "backend"

    def complete(self, messages_batch: list[list[dict]], *, temperature: float = 0.7, top_p: float = 0.9,
                 max_tokens: int = 512, seeds: list[int] | None = None) -> list:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"


class CallableBackend(Backend):
    """Replies from a function fn(messages, seed) -> str (or Failure); it may raise to stop the step."""

    def __init__(self, fn, name: str = "callable"):
        self.fn, self.name = fn, name

    def complete(self, messages_batch, *, temperature=0.7, top_p=0.9, max_tokens=512, seeds=None):
        seeds = seeds if seeds is not None else [0] * len(messages_batch)
        return [self.fn(m, s) for m, s in zip(messages_batch, seeds)]


class LocalBackend(Backend):
    """A psyche model in this process. Give `model_dir`, or an already loaded `model` and `tokenizer` (the
    demo pipeline passes the models it trains; their train/eval mode is left as it is, generation runs without
    gradients). Replies are decoded without special tokens.

    A prompt too long for the context is a Failure; a prompt that leaves less room than max_tokens is answered
    with what fits. `batch_size` bounds the rows of one sampler call."""

    def __init__(self, model_dir=None, *, model=None, tokenizer=None, dtype=None, device=None, batch_size: int = 16,
                 top_k: int = 0, min_p: float = 0.0, name: str | None = None):
        from pathlib import Path

        from psyche.engine import Engine

        if model is None:
            import torch

            from psyche.tokenizer import Tokenizer
            from psyche.weights import load_pretrained

            if model_dir is None:
                raise ValueError("LocalBackend needs model_dir, or model and tokenizer")
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            model, _ = load_pretrained(model_dir, dtype=dtype, device=device)
            model.eval()
            tokenizer = Tokenizer.from_dir(model_dir)
        elif tokenizer is None:
            raise ValueError("LocalBackend(model=...) needs its tokenizer too")
        self.engine = Engine(model, tokenizer, max_rows=batch_size)
        self.batch_size, self.top_k, self.min_p = batch_size, top_k, min_p
        self.name = name or (f"local:{Path(model_dir).name}" if model_dir is not None else "local")

    def complete(self, messages_batch, *, temperature=0.7, top_p=0.9, max_tokens=512, seeds=None):
        from psyche.config import SamplingParams
        from psyche.engine import GenRequest

        tok, max_len = self.engine.tok, self.engine.max_len
        seeds = seeds if seeds is not None else [stable_seed(m) for m in messages_batch]
        out: list = [None] * len(messages_batch)
        reqs = []
        for i, (msgs, seed) in enumerate(zip(messages_batch, seeds)):
            ids, _ = tok.encode_chat(msgs, add_generation_prompt=True)
            if len(ids) >= max_len:
                out[i] = Failure(f"prompt too long: {len(ids)} tokens, context {max_len}")
                continue
            sampling = SamplingParams(temperature, top_p, self.top_k, self.min_p)
            reqs.append((i, GenRequest(ids, min(max_tokens, max_len - len(ids)), sampling=sampling, seed=seed)))
        for k in range(0, len(reqs), self.batch_size):
            chunk = reqs[k:k + self.batch_size]
            self.engine.run([r for _, r in chunk])
            for i, r in chunk:
                out[i] = Failure(r.error) if r.error else tok.decode(r.tokens[0], skip_special_tokens=True)
        return out


class _Retry(Exception):
    """A transient error: worth another attempt."""


class OpenAIBackend(Backend):
    """Chat completions over HTTP(S) with the standard library (see the module docstring for the retry rules).

    base_url: up to and including the version, e.g. "http://127.0.0.1:8000/v1" or "https://api.openai.com/v1".
    api_key_env: the environment variable holding the key (sent as a Bearer token when set).
    timeout: seconds for connecting and for each read (a server silent for longer is a timeout).
    extra_body: more request fields, e.g. {"top_k": 20} for servers that take them.
    Proxies are not used for loopback hosts; for others HTTPS_PROXY / https_proxy is honoured (CONNECT tunnel).
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 max_retries: int = 3, backoff: float = 1.0, concurrency: int = 8, extra_body: dict | None = None,
                 name: str | None = None):
        u = urlsplit(base_url.rstrip("/"))
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"base_url must be http(s)://host[:port]/path, got {base_url!r}")
        self.scheme, self.host, self.port, self.path = u.scheme, u.hostname, u.port, u.path + "/chat/completions"
        self.model, self.api_key_env, self.timeout = model, api_key_env, timeout
        self.max_retries, self.backoff, self.concurrency = max_retries, backoff, max(1, concurrency)
        self.extra_body = dict(extra_body or {})
        self.name = name or model
        self.sleep = time.sleep  # replaceable, e.g. to record the backoff delays
        self.attempts = 0  # HTTP attempts made (all requests)
        self._count = threading.Lock()

    # ---- one HTTP attempt ----
    def _connection(self):
        proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
        if self.scheme == "https":
            if proxy and self.host not in LOOPBACK:
                p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
                conn = http.client.HTTPSConnection(p.hostname, p.port or 8080, timeout=self.timeout)
                conn.set_tunnel(self.host, self.port or 443)
                return conn
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _post(self, body: dict) -> dict:
        """One attempt. Returns the decoded JSON; raises _Retry (transient) or Failure-worthy RuntimeError."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body, ensure_ascii=False).encode()
        with self._count:
            self.attempts += 1
        conn = self._connection()
        try:
            conn.request("POST", self.path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (TimeoutError, socket.timeout):
            raise _Retry(f"timed out after {self.timeout:g}s") from None
        except (OSError, http.client.HTTPException) as e:
            raise _Retry(f"connection error: {type(e).__name__}: {e}") from None
        finally:
            conn.close()
        if resp.status == 429 or resp.status >= 500:
            raise _Retry(f"HTTP {resp.status}: {_error_message(raw)}")
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {_error_message(raw)}")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RuntimeError(f"response is not JSON: {raw[:200]!r}") from None

    def _one(self, messages, seed, sampling) -> str | Failure:
        body = {"model": self.model, "messages": messages, **sampling, **self.extra_body}
        if seed is not None:
            body["seed"] = seed
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                reply = self._post(body)
            except _Retry as e:
                last = str(e)
                if attempt < self.max_retries:
                    self.sleep(self.backoff * 2 ** attempt)
                continue
            except RuntimeError as e:
                return Failure(f"{self.name}: {e}")
            try:
                content = reply["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                return Failure(f"{self.name}: malformed response: {json.dumps(reply)[:200]}")
            if not isinstance(content, str):
                return Failure(f"{self.name}: response content is not text")
            return content
        return Failure(f"{self.name}: gave up after {self.max_retries + 1} attempts: {last}")

    def complete(self, messages_batch, *, temperature=0.7, top_p=0.9, max_tokens=512, seeds=None):
        sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
        seeds = seeds if seeds is not None else [None] * len(messages_batch)
        if len(messages_batch) <= 1 or self.concurrency == 1:
            return [self._one(m, s, sampling) for m, s in zip(messages_batch, seeds)]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(messages_batch))) as pool:
            return list(pool.map(lambda ms: self._one(ms[0], ms[1], sampling), zip(messages_batch, seeds)))


def _error_message(raw: bytes) -> str:
    """The `error.message` of an OpenAI-style error body, else the start of the body."""
    try:
        err = json.loads(raw).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        if isinstance(err, str):
            return err[:300]
    except (ValueError, AttributeError):
        pass
    return raw[:200].decode("utf-8", "replace")


def from_spec(spec: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0, max_retries: int = 3,
              backoff: float = 1.0, concurrency: int = 8, batch_size: int = 16, device=None, dtype=None) -> Backend:
    """A backend from a command-line spec:
    - `local:PATH`              a psyche checkpoint directory, in this process;
    - `MODEL@URL`               an OpenAI-compatible endpoint, e.g. `gpt-4o@https://api.openai.com/v1`
                                or `tiny@http://127.0.0.1:8000/v1`."""
    if spec.startswith("local:"):
        return LocalBackend(spec[len("local:"):], batch_size=batch_size, device=device, dtype=dtype)
    if "@" in spec:
        model, url = spec.rsplit("@", 1)
        if model and url.startswith(("http://", "https://")):
            return OpenAIBackend(url, model, api_key_env=api_key_env, timeout=timeout, max_retries=max_retries,
                                 backoff=backoff, concurrency=concurrency, name=spec)
    raise ValueError(f"backend spec {spec!r}: expected local:PATH or MODEL@http(s)://host/v1")
