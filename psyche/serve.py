"""`psyche serve MODEL_DIR`: an OpenAI-compatible chat-completions server for a psyche checkpoint.

    psyche serve ckpt/ --port 8000            # http://127.0.0.1:8000/v1/chat/completions, /v1/models

Two parts:
- `Engine` (psyche/engine.py): runs generation requests through `sampler.generate` as rows of one batch; a
  row leaves the batch when it ends: its stop token, its own max_tokens, or its request cancelled (a client
  that disconnected).
- The HTTP layer (this file) (standard library ThreadingHTTPServer, one thread per connection, HTTP/1.0: a connection
  carries one request): validates each request strictly and answers errors as OpenAI-style JSON
  {"error": {"message", "type", "param", "code"}} with a 4xx status, then keeps serving. With an API key
  (--api-key or PSYCHE_API_KEY) every request must carry `Authorization: Bearer <key>` (401 otherwise), as
  with OpenAI and vLLM. A client that disconnects (while queued, generating or streaming) cancels its request.

Request rules (POST /v1/chat/completions, a JSON object):
- fields: messages (required), model, max_tokens / max_completion_tokens, temperature, top_p, top_k, min_p,
  n, seed, stream, stream_options {include_usage}, stop (null only), user (ignored). Any other field is a 400:
  silently ignoring a setting the client believes it set would be worse.
- messages: a non-empty list of {role: system|user|assistant, content: string or [{type: "text", text}]}.
- model: when given, must be the served name (404 otherwise).
- bounds: body <= --max-body bytes (413); 1 <= max_tokens <= --max-tokens; prompt tokens + max_tokens <= the
  model's max_position_embeddings (400 context_length_exceeded); 1 <= n <= MAX_N; temperature 0 (greedy) or
  in [1e-5, 2] (SamplingParams.MIN_TEMPERATURE); 0 < top_p <= 1 (the most probable token is always kept);
  integers are JSON integers (true/false are not).
- defaults: max_tokens = min(--default-max-tokens, room left in the context); temperature 1, top_p 1;
  seed random when absent (give one for reproducible sampling; temperature 0 is greedy).
- stream true: Server-Sent Events, one `data: {chat.completion.chunk}` per new piece of text, a final chunk
  with finish_reason, an optional usage chunk, then `data: [DONE]`. Text is decoded incrementally and held
  back while it ends in an incomplete UTF-8 character, so the pieces join to the non-streaming text.
- finish_reason: "stop" when a stop token (<|im_end|>, <|endoftext|>) ended the row, else "length".
The prompt is the tokenizer's ChatML with the generation prompt; without a system message the tokenizer's
default system prompt is used (as Hugging Face chat templates do).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import queue
import random
import select
import socket
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import click

from psyche.config import SamplingError, SamplingParams
from psyche.engine import Engine, GenRequest, Overloaded  # noqa: F401 (re-exported: the engine behind the server)

MAX_N = 16
API_KEY_ENV = "PSYCHE_API_KEY"
ROLES = ("system", "user", "assistant")
FIELDS = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
          "n", "seed", "stream", "stream_options", "stop", "user"}


# ---------------------------------------------------------------- request validation

class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _int(body, name, lo, hi):
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(400, f"'{name}' must be an integer, got {type(v).__name__}", name, "invalid_type")
    if not lo <= v <= hi:
        raise RequestError(400, f"'{name}' must be between {lo} and {hi}, got {v}", name, "invalid_value")
    return v


def _num(body, name, lo, hi, lo_open=False):
    v = body[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(400, f"'{name}' must be a number, got {type(v).__name__}", name, "invalid_type")
    if not (lo < v <= hi if lo_open else lo <= v <= hi):
        bound = f"in ({lo}, {hi}]" if lo_open else f"between {lo} and {hi}"
        raise RequestError(400, f"'{name}' must be {bound}, got {v}", name, "invalid_value")
    return float(v)


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(400, f"{where} must be an object", where, "invalid_type")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise RequestError(400, f"{where}: unknown field(s) {sorted(extra)}", where, "unknown_field")
        if m.get("role") not in ROLES:
            raise RequestError(400, f"{where}.role must be one of {list(ROLES)}, got {m.get('role')!r}",
                               f"{where}.role", "invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise RequestError(400, f"{where}.content: only text parts {{type: 'text', text}} are "
                                            "supported", f"{where}.content", "invalid_value")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise RequestError(400, f"{where}.content must be a string", f"{where}.content", "invalid_type")
        out.append({"role": m["role"], "content": content})
    return out


def parse_request(body, *, tokenizer, model_name: str, max_len: int, max_tokens_limit: int,
                  default_max_tokens: int) -> tuple[GenRequest, dict]:
    """A decoded JSON body -> (GenRequest, options {stream, include_usage}); raises RequestError."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; supported: {sorted(FIELDS)}", unknown[0],
                           "unknown_field")
    if "messages" not in body:
        raise RequestError(400, "'messages' is required", "messages", "missing_field")
    if "model" in body:
        if not isinstance(body["model"], str):
            raise RequestError(400, "'model' must be a string", "model", "invalid_type")
        if body["model"] != model_name:
            raise RequestError(404, f"model {body['model']!r} not found; this server serves {model_name!r}",
                               "model", "model_not_found")
    if body.get("stop") is not None:
        raise RequestError(400, "'stop' strings are not supported (generation ends at the chat stop tokens)",
                           "stop", "unsupported")
    messages = _messages(body["messages"])
    g = GenRequest(prompt=[], max_tokens=0)
    for key in ("temperature", "top_p", "top_k", "min_p", "n", "seed", "max_tokens", "max_completion_tokens"):
        if key in body and body[key] is None:
            del body[key]  # explicit null = default
    sampling = {}
    if "temperature" in body:
        sampling["temperature"] = _num(body, "temperature", 0.0, 2.0)
    if "top_p" in body:
        sampling["top_p"] = _num(body, "top_p", 0.0, 1.0, lo_open=True)
    if "top_k" in body:
        sampling["top_k"] = _int(body, "top_k", 0, 1 << 20)
    if "min_p" in body:
        sampling["min_p"] = _num(body, "min_p", 0.0, 1.0)
    try:
        g.sampling = SamplingParams(**sampling)  # its own checks: e.g. a temperature too small to divide by
    except SamplingError as e:
        raise RequestError(400, str(e), e.key, "invalid_value") from None
    if "n" in body:
        g.n = _int(body, "n", 1, MAX_N)
    g.seed = _int(body, "seed", -(1 << 63), (1 << 63) - 1) if "seed" in body else random.getrandbits(62)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false", "stream", "invalid_type")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or set(opts) - {"include_usage"} or not isinstance(
            opts.get("include_usage", False), bool):
        raise RequestError(400, "'stream_options' must be {\"include_usage\": bool}", "stream_options")
    ids, _ = tokenizer.encode_chat(messages, add_generation_prompt=True)
    g.prompt = ids
    room = max_len - len(ids)
    if room < 1:
        raise RequestError(400, f"the prompt is {len(ids)} tokens; this model's context is {max_len}", "messages",
                           "context_length_exceeded")
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if key in body:
        g.max_tokens = _int(body, key, 1, max_tokens_limit)
        if g.max_tokens > room:
            raise RequestError(400, f"prompt ({len(ids)} tokens) + {key} ({g.max_tokens}) exceeds this model's "
                                    f"context ({max_len})", key, "context_length_exceeded")
    else:
        g.max_tokens = min(default_max_tokens, room)
    return g, {"stream": stream, "include_usage": bool(opts.get("include_usage", False))}


# ---------------------------------------------------------------- HTTP

class TextStream:
    """Incremental decoding of one row: `push(token)` returns the new text (held back while it ends in an
    incomplete UTF-8 character), `finish()` the rest. The pieces join to decode(all, skip_special_tokens)."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.shown = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new

    def finish(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        new = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown += new
        return new


def _readable(sock) -> bool:
    """Whether `sock` has data, an end of file or an error waiting, without waiting. poll takes any descriptor;
    select.select (only where poll is missing, e.g. Windows, whose select has no such limit) refuses those
    >= FD_SETSIZE (1024), which a busy server reaches."""
    if hasattr(select, "poll"):
        p = select.poll()
        p.register(sock, select.POLLIN)
        return bool(p.poll(0))
    return bool(select.select([sock], [], [], 0)[0])


class Handler(BaseHTTPRequestHandler):
    server_version = "psyche-serve/0.1"
    timeout = 60  # seconds a client may take to send its request (a stalled client frees its thread)

    def log_message(self, fmt, *args):
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} - {fmt % args}\n")

    def _json(self, status: int, obj: dict, headers: dict | None = None):
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8", "backslashreplace")  # a lone surrogate a
        #   client sent (echoed in an error) becomes its JSON escape
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: RequestError, headers: dict | None = None):
        self._json(e.status, e.body(), headers)

    def _authorized(self) -> bool:
        """True without an API key, or when the request carries `Authorization: Bearer <key>`; otherwise answers
        401 (after reading the refused body, so the client can read the answer) and returns False."""
        key = self.server.api_key
        if not key:
            return True
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
            return True
        if self.command == "POST":
            try:
                self._drain(int(self.headers.get("Content-Length") or 0), limit=self.server.max_body)
            except ValueError:
                pass
        self._error(RequestError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                                 code="invalid_api_key"), {"WWW-Authenticate": "Bearer"})
        return False

    def _client_gone(self) -> bool:
        """The client closed its connection: the socket is readable and at end of file, or reset."""
        try:
            return _readable(self.connection) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:  # reset by the peer
            return True

    def do_GET(self):
        if not self._authorized():
            return
        if self.path.rstrip("/") == "/v1/models":
            s = self.server
            self._json(200, {"object": "list", "data": [{"id": s.model_name, "object": "model",
                                                         "created": s.created, "owned_by": "psyche"}]})
        elif self.path.rstrip("/") in ("/health", ""):
            self._json(200, {"status": "ok"})
        else:
            self._error(RequestError(404, f"no route GET {self.path}", code="not_found"))

    def do_POST(self):
        if not self._authorized():
            return
        try:
            if self.path.rstrip("/") != "/v1/chat/completions":
                raise RequestError(404, f"no route POST {self.path}", code="not_found")
            body = self._read_json()
            s = self.server
            g, opts = parse_request(body, tokenizer=s.engine.tok, model_name=s.model_name, max_len=s.engine.max_len,
                                    max_tokens_limit=s.max_tokens, default_max_tokens=s.default_max_tokens)
        except RequestError as e:
            self._error(e)
            return
        except Exception as e:  # noqa: BLE001 (a request no rule above foresaw: still an answer, never a drop)
            self.log_error("request not understood: %s: %s", type(e).__name__, e)
            self._error(RequestError(400, f"the request could not be read ({type(e).__name__})", code="invalid_request"))
            return
        if opts["stream"]:
            self._stream(g, opts["include_usage"])
        else:
            self._complete(g)

    def _read_json(self):
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            raise RequestError(411, "a Content-Length header is required", code="length_required")
        try:
            n = int(length)
        except ValueError:
            raise RequestError(400, "invalid Content-Length") from None
        if n < 0 or n > self.server.max_body:
            self._drain(n)
            raise RequestError(413, f"request body of {n} bytes exceeds the limit of {self.server.max_body}",
                               code="request_too_large")
        raw = self.rfile.read(n)
        try:
            return json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, JSON nested deeper than Python's stack
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
            raise RequestError(400, f"invalid JSON body: {why}", code="invalid_json") from None

    def _drain(self, n: int, limit: int = 16 << 20):
        """Read and drop up to `limit` bytes of a refused body, so the client can read the error (closing a socket
        with unread data resets the connection)."""
        left = min(max(n, 0), limit)
        try:
            while left > 0:
                got = self.rfile.read(min(left, 1 << 16))
                if not got:
                    break
                left -= len(got)
        except OSError:
            pass

    def _submit(self, g: GenRequest) -> bool:
        try:
            self.server.engine.submit(g)
            return True
        except Overloaded as e:
            self._error(RequestError(503, str(e), code="overloaded"))
            return False

    def _head(self, cid):
        s = self.server
        return {"id": cid, "created": int(time.time()), "model": s.model_name}

    def _complete(self, g: GenRequest):
        if not self._submit(g):
            return
        while not g.done.wait(0.1):
            if self._client_gone():  # nobody will read the answer: free its rows
                g.cancel()
                return
        if g.error:
            self._error(RequestError(500, g.error, code="generation_failed"))
            return
        tok = self.server.engine.tok
        choices = [{"index": j, "message": {"role": "assistant",
                                            "content": tok.decode(g.tokens[j], skip_special_tokens=True)},
                    "finish_reason": "stop" if g.finished[j] else "length"} for j in range(g.n)]
        completion = sum(len(t) for t in g.tokens)
        try:
            self._json(200, {**self._head(f"chatcmpl-{uuid.uuid4().hex}"), "object": "chat.completion",
                             "choices": choices, "usage": {"prompt_tokens": len(g.prompt),
                                                           "completion_tokens": completion,
                                                           "total_tokens": len(g.prompt) + completion}})
        except OSError:
            pass  # the client left as its answer was ready

    def _stream(self, g: GenRequest, include_usage: bool):
        tok = self.server.engine.tok
        events: queue.Queue = queue.Queue()
        g.on_token = lambda j, t: events.put((j, t))
        if not self._submit(g):
            return
        head = {**self._head(f"chatcmpl-{uuid.uuid4().hex}"), "object": "chat.completion.chunk"}
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

        def send(obj):
            self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
            self.wfile.flush()

        def chunk(j, delta, finish=None):
            send({**head, "choices": [{"index": j, "delta": delta, "finish_reason": finish}]})

        try:
            streams = [TextStream(tok) for _ in range(g.n)]
            for j in range(g.n):
                chunk(j, {"role": "assistant", "content": ""})
            while True:
                try:
                    j, t = events.get(timeout=0.05)
                except queue.Empty:
                    if g.done.is_set() and events.empty():
                        break
                    if self._client_gone():  # left while queued or between tokens
                        g.cancel()
                        return
                    continue
                piece = streams[j].push(t)
                if piece:
                    chunk(j, {"content": piece})
                elif self._client_gone():  # text held back (an incomplete character): no write to fail
                    g.cancel()
                    return
            if g.error:
                send(RequestError(500, g.error, code="generation_failed").body())
            else:
                for j in range(g.n):
                    rest = streams[j].finish()
                    if rest:
                        chunk(j, {"content": rest})
                    chunk(j, {}, "stop" if g.finished[j] else "length")
                if include_usage:
                    completion = sum(len(t) for t in g.tokens)
                    send({**head, "choices": [], "usage": {"prompt_tokens": len(g.prompt),
                                                           "completion_tokens": completion,
                                                           "total_tokens": len(g.prompt) + completion}})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except OSError:  # the client went away (broken pipe, reset, a write timed out): free its rows
            g.cancel()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # listen backlog: the default 5 resets bursts of concurrent clients


def make_server(model, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 8000, *,
                max_tokens: int = 4096, default_max_tokens: int = 512, max_body: int = 1 << 20,
                max_rows: int = 32, quiet: bool = False, api_key: str | None = None) -> Server:
    """A started engine behind an HTTP server that is not yet serving: call `serve_forever()` (port 0 picks a
    free port; see `server_address`), and `shutdown()`, `server_close()`, `engine.stop()` to end. With
    `api_key`, every request needs `Authorization: Bearer <api_key>`."""
    srv = Server((host, port), Handler)
    engine = Engine(model, tokenizer, max_rows=max_rows).start()
    srv.engine, srv.model_name, srv.created, srv.api_key = engine, model_name, int(time.time()), api_key or None
    srv.max_tokens = min(max_tokens, engine.max_len)
    srv.default_max_tokens, srv.max_body, srv.quiet = default_max_tokens, max_body, quiet
    return srv


def is_loopback(host: str) -> bool:
    """Whether a bound address is reachable from this machine only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


@click.command("serve")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind. Beyond this machine, set an API key (and use TLS in front: the server "
                   "speaks plain HTTP).")
@click.option("--api-key", envvar=API_KEY_ENV, default=None, show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every request (401 otherwise). Prefer the environment "
                   "variable: a key on the command line is visible in the process list.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port (0 = any free port).")
@click.option("--model-name", default=None, help="Name clients use in 'model' (default: the directory name).")
@click.option("--max-tokens", "max_tokens", default=4096, show_default=True, type=click.IntRange(min=1),
              help="Largest max_tokens a request may ask for.")
@click.option("--default-max-tokens", default=512, show_default=True, type=click.IntRange(min=1),
              help="max_tokens when a request gives none.")
@click.option("--max-body", default=1 << 20, show_default=True, type=click.IntRange(min=1),
              help="Largest request body in bytes.")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(min=1),
              help="Most rows (requests x n) in one sampler batch.")
@click.option("--dtype", default=None, help="float32, bfloat16, ... (default: the checkpoint's)")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available)")
@click.option("--quiet", is_flag=True, help="Do not log requests.")
def serve(model_dir, host, api_key, port, model_name, max_tokens, default_max_tokens, max_body, max_batch, dtype,
          device, quiet):
    """Serve a checkpoint with an OpenAI-compatible API (/v1/chat/completions, /v1/models)."""
    from pathlib import Path

    import torch

    from psyche.tokenizer import Tokenizer
    from psyche.weights import load_pretrained

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_pretrained(model_dir, dtype=getattr(torch, dtype) if dtype else None, device=device)
    model.eval()
    name = model_name or Path(model_dir).resolve().name
    srv = make_server(model, Tokenizer.from_dir(model_dir), name, host, port, max_tokens=max_tokens,
                      default_max_tokens=default_max_tokens, max_body=max_body, max_rows=max_batch, quiet=quiet,
                      api_key=api_key)
    h, p = srv.server_address[:2]
    if not api_key and not is_loopback(h):
        click.echo(f"warning: listening on {h} without an API key: anyone who can reach this address can use the "
                   f"model (set {API_KEY_ENV} or --api-key)", err=True)
    click.echo(f"serving {name!r} on http://{h}:{p}/v1 (Ctrl-C to stop)", err=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
        srv.engine.stop()
