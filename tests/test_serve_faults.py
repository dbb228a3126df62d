"""`psyche serve` under faults and access control: clients that disconnect mid-stream free their batch rows while
everyone else gets a complete answer; an API key turns unauthenticated requests away with 401."""

import http.client
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from psyche.sampler import SamplingParams, generate, row_seeds
from psyche.serve import make_server
from psyche.tokenizer import Tokenizer
from psyche.weights import load_pretrained

MAX_TOKENS = 48
HALFWAY = MAX_TOKENS // 2


def start(tiny_ckpt, **kw):
    model, _ = load_pretrained(tiny_ckpt)
    tok = Tokenizer.from_dir(tiny_ckpt)
    srv = make_server(model, tok, "tiny", port=0, max_tokens=256, quiet=True, **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, model, tok


def stop(srv):
    srv.shutdown()
    srv.server_close()
    srv.engine.stop()


def post(srv, body, headers=None, timeout=120):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=timeout)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=headers or {})
    return conn, conn.getresponse()


def alone(model, tok, messages, seed):
    """The sampler's tokens for this request on its own (T 1.0, the request's seed)."""
    ids, _ = tok.encode_chat(messages, add_generation_prompt=True)
    r = generate(model, [ids], max_new_tokens=MAX_TOKENS, temperature=1.0, stop_token_ids=tok.stop_ids,
                 pad_id=tok.pad_id, seed=row_seeds(seed, 1))
    toks = r.tokens[0, : r.lengths[0]].tolist()
    return tok.decode(toks, skip_special_tokens=True), bool(r.finished[0])


def read_events(resp):
    """SSE events of a streaming answer as decoded JSON, up to [DONE] (-> done=True) or the end of the
    connection (-> done=False)."""
    events = []
    while True:
        line = resp.fp.readline()
        if not line:
            return events, False
        line = line.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return events, True
        e = json.loads(line[len("data: "):])
        events.append(e)


def test_64_streaming_clients_16_disconnect_halfway(tiny_ckpt, monkeypatch):
    """48 clients read their whole answer; 16 hang up when half of theirs is generated. The others' answers are
    complete and equal to the sampler's for each request alone; each of the 16 is noticed and its row leaves
    its batch before its end (rows_freed); the server keeps serving.

    So that "halfway" is halfway however busy the machine is, the hang-ups happen inside the engine's decode
    step number HALFWAY of a batch (the test closes those clients' sockets there), and that step waits until
    the server has noticed them."""
    import psyche.decode
    from psyche.serve import Engine, GenRequest

    monkeypatch.setenv("PSYCHE_SAMPLER", "eager")  # "halfway" is a step of the eager path's decode loop
    srv, model, tok = start(tiny_ckpt)
    try:
        jobs = [([{"role": "user", "content": f"来访者{i}：最近总是失眠，怎么办？"}], 1000 + i) for i in range(64)]
        want = [alone(model, tok, m, s) for m, s in jobs]
        long = [i for i, (_, finished) in enumerate(want) if not finished]  # still running at HALFWAY
        assert len(long) >= 16
        leavers = set(long[::max(1, len(long) // 16)][:16])
        socks, noticed, current, step = {}, set(), set(), [0]
        cancel, decode, decode_batch = GenRequest.cancel, psyche.decode.decode_one_token, Engine._decode

        def noticing(g):
            noticed.add(g.seed - 1000)
            cancel(g)

        def watched(self, batch, owner, **kw):
            current.clear()
            current.update(r.seed - 1000 for r in batch)
            step[0] = 0
            return decode_batch(self, batch, owner, **kw)

        def halfway(model_, cache, tokens):
            step[0] += 1
            if step[0] == HALFWAY:
                here = current & leavers
                for i in here:
                    socks[i].shutdown(socket.SHUT_RDWR)  # client i hangs up
                deadline = time.time() + 60
                while not here <= noticed and time.time() < deadline:
                    time.sleep(0.005)
            return decode(model_, cache, tokens)

        monkeypatch.setattr(GenRequest, "cancel", noticing)
        monkeypatch.setattr(Engine, "_decode", watched)
        monkeypatch.setattr(psyche.decode, "decode_one_token", halfway)
        results, barrier = [None] * 64, threading.Barrier(64)
        cancelled0, freed0 = srv.engine.cancelled, srv.engine.rows_freed

        def client(i):
            messages, seed = jobs[i]
            conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=300)
            conn.connect()
            socks[i] = conn.sock
            barrier.wait()
            conn.request("POST", "/v1/chat/completions", body=json.dumps(
                {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": seed, "stream": True}))
            resp = conn.getresponse()
            try:
                results[i] = (resp.status, *read_events(resp))
            except ConnectionResetError:  # a leaver reading its own shut-down socket: EOF or a reset, by timing
                if i not in leavers:
                    raise
                results[i] = (resp.status, [], False)
            finally:
                resp.close()
                conn.close()

        threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        for i, (status, events, done) in enumerate(results):
            assert status == 200
            if i in leavers:
                assert not done
                continue
            assert done, f"client {i} got no [DONE]"
            text = "".join(c["delta"].get("content", "") for e in events for c in e["choices"])
            finish = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
            assert (text, finish) == (want[i][0], ["stop" if want[i][1] else "length"])
        assert noticed == leavers
        assert srv.engine.cancelled - cancelled0 == 16
        assert srv.engine.rows_freed - freed0 == 16  # each left its batch at HALFWAY, not at max_tokens
        conn, resp = post(srv, {"messages": [{"role": "user", "content": "还在吗？"}], "max_tokens": 4,
                                "temperature": 0})
        assert resp.status == 200 and json.loads(resp.read())["choices"][0]["finish_reason"] in ("stop", "length")
        conn.close()
    finally:
        stop(srv)


def test_a_request_cancelled_before_it_starts_is_never_run(tiny_ckpt):
    from psyche.serve import Engine, GenRequest

    model, _ = load_pretrained(tiny_ckpt)
    tok = Tokenizer.from_dir(tiny_ckpt)
    engine = Engine(model, tok)
    ids, _ = tok.encode_chat([{"role": "user", "content": "你好"}], add_generation_prompt=True)
    gone = GenRequest(prompt=ids, max_tokens=8)
    gone.cancel()
    kept = GenRequest(prompt=ids, max_tokens=8, sampling=SamplingParams(temperature=0.0))
    engine.run([gone, kept])
    assert gone.done.is_set() and gone.tokens == [[]] and gone.error is None
    assert kept.done.is_set() and (len(kept.tokens[0]) == 8 or kept.finished[0])
    assert engine.cancelled == 1 and engine.rows_max == 1  # the batch held the other request's row only


class _LateSubmits(queue.Queue):
    """A queue where requests land just after the worker takes stop's wake-up from it and fill it: the race that
    once blocked the worker for good as it put the wake-up back."""

    def __init__(self, maxsize, late):
        super().__init__(maxsize)
        self.late = late

    def get_nowait(self):
        r = super().get_nowait()
        if r is None:
            for x in self.late:
                self.put_nowait(x)
            self.late = []
        return r


def test_stop_while_gathering_ends_the_worker_and_fails_what_is_queued():
    """The worker meets stop's wake-up while it gathers a batch and the queue fills behind it: the gathered
    request still runs, the worker ends at once, the queued ones fail with a clear error, a later submit is
    refused."""
    from types import SimpleNamespace

    from psyche.engine import STOPPED, Engine, GenRequest, Overloaded

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64))
    engine = Engine(model, SimpleNamespace(stop_ids=[0], pad_id=0), gather_s=0.2)

    def run(batch):  # a stand-in for generation: one stop token each
        for r in batch:
            r.tokens, r.finished = [[0]], [True]
            r.done.set()

    engine.run = run
    first, late = GenRequest([1], 1), [GenRequest([1], 1), GenRequest([1], 1)]
    engine.queue = _LateSubmits(2, late)
    engine.start()
    engine.submit(first)
    stopper = threading.Thread(target=engine.stop, daemon=True)
    stopper.start()
    for r in (first, *late):
        assert r.done.wait(5), "a request was left waiting"
    stopper.join(5)
    assert not stopper.is_alive(), "stop() waited for a stuck worker"
    assert first.error is None and first.finished == [True]
    assert all(r.error == STOPPED for r in late)
    with pytest.raises(Overloaded, match="shutting down"):
        engine.submit(GenRequest([1], 1))


def test_api_key_required_on_every_route(tiny_ckpt):
    srv, _, _ = start(tiny_ckpt, api_key="s3cret-key")
    port = srv.server_address[1]
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 3, "temperature": 0}
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"},
                        {"Authorization": "Basic s3cret-key"}):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", "/v1/models", headers=headers)
            resp = conn.getresponse()
            err = json.loads(resp.read())["error"]
            assert resp.status == 401 and err["code"] == "invalid_api_key"
            assert resp.getheader("WWW-Authenticate") == "Bearer"
            conn.close()
            conn, resp = post(srv, body, headers)
            assert resp.status == 401 and json.loads(resp.read())["error"]["code"] == "invalid_api_key"
            conn.close()
        ok = {"Authorization": "Bearer s3cret-key"}
        conn, resp = post(srv, body, ok)
        assert resp.status == 200 and json.loads(resp.read())["choices"][0]["message"]["content"] is not None
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/v1/models", headers=ok)
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        stop(srv)


# ---- descriptors above 1023: select.select refuses them, which once read as "the client left" ----

@pytest.fixture
def low_fds_taken():
    """Every file descriptor below 1024 in use (pipes), so the next socket, the server's side of a connection
    included, is above select.select's FD_SETSIZE; yields a socketpair (a, b) made then."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1100:
        if hard != resource.RLIM_INFINITY and hard < 1100:
            pytest.skip(f"the open-files limit ({soft}, hard {hard}) is too low to open 1024 descriptors")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1100, hard))
    fds = []
    try:
        while not fds or fds[-1] < 1023:  # os.pipe takes the lowest free descriptors
            fds += os.pipe()
        a, b = socket.socketpair()
        with a, b:
            assert a.fileno() >= 1024 and b.fileno() >= 1024
            yield a, b
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_client_gone_on_a_descriptor_above_1023(low_fds_taken):
    from psyche.serve import Handler

    a, b = low_fds_taken
    a.settimeout(60)  # as the server's connections (Handler.timeout)
    handler = Handler.__new__(Handler)  # only its connection is read
    handler.connection = a
    assert not handler._client_gone()  # connected, nothing sent
    b.sendall(b"x")
    assert not handler._client_gone()  # connected, data waiting
    assert a.recv(1) == b"x"
    b.close()
    assert handler._client_gone()  # the peer closed


def test_requests_on_descriptors_above_1023_are_answered(tiny_ckpt, low_fds_taken, monkeypatch):
    """With every descriptor below 1024 taken, a reply and a stream still come whole. Each batch is held back a
    moment so that the handlers look for a departed client while they wait."""
    srv, _, _ = start(tiny_ckpt)
    run = srv.engine.run
    monkeypatch.setattr(srv.engine, "run", lambda batch: (time.sleep(0.3), run(batch)))
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4, "temperature": 0}
    try:
        conn, resp = post(srv, body)
        assert resp.status == 200 and json.loads(resp.read())["choices"][0]["finish_reason"] in ("stop", "length")
        conn.close()
        conn, resp = post(srv, {**body, "stream": True})
        events, done = read_events(resp)
        assert resp.status == 200 and done and events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        conn.close()
    finally:
        stop(srv)


def _serve(tiny_ckpt, *args, env=None):
    """Start `psyche serve` on a free port -> (process, port, the stderr lines up to the "serving" line)."""
    env = {**{k: v for k, v in os.environ.items() if k != "PSYCHE_API_KEY"}, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "psyche.cli", "serve", str(tiny_ckpt), "--port", "0", "--quiet",
                             *args], stderr=subprocess.PIPE, text=True, env=env)
    lines, deadline = [], time.time() + 120
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise AssertionError("server exited: " + "".join(lines))
        lines.append(line)
        if m := re.search(r"http://[^:]+:(\d+)/v1", line):
            return proc, int(m.group(1)), lines
    proc.kill()
    raise AssertionError("no serving line: " + "".join(lines))


@pytest.mark.parametrize("key", [None, "from-env"])
def test_cli_warns_on_a_public_address_without_a_key(tiny_ckpt, key):
    proc, port, lines = _serve(tiny_ckpt, "--host", "0.0.0.0", env={"PSYCHE_API_KEY": key} if key else None)
    try:
        warned = any("warning: listening on 0.0.0.0 without an API key" in line for line in lines)
        assert warned == (key is None), lines
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/v1/models")
        assert conn.getresponse().status == (401 if key else 200)
        conn.close()
    finally:
        proc.terminate()
        proc.wait(30)


def test_cli_on_loopback_does_not_warn(tiny_ckpt):
    proc, _, lines = _serve(tiny_ckpt)
    try:
        assert not any("warning" in line for line in lines), lines
    finally:
        proc.terminate()
        proc.wait(30)


# ---- malformed bodies and broken models: always an HTTP answer ----

def raw_post(srv, data: bytes, timeout=60):
    """POST raw bytes -> (status, decoded JSON body); a dropped connection fails the test."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=timeout)
    conn.request("POST", "/v1/chat/completions", body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def odd_values(rng, depth=0):
    """A JSON value of any type, now and then nested."""
    kinds = {"null": lambda: None, "true": lambda: True, "int": lambda: rng.randint(-5, 5), "big": lambda: 10 ** 400,
             "float": lambda: rng.random() * 3, "nan": lambda: float("nan"),
             "str": lambda: rng.choice(["", "user", "x" * 50, "A"]), "surrogate": lambda: "\ud800",
             "list": lambda: [odd_values(rng, depth + 1) for _ in range(rng.randint(0, 3))],
             "dict": lambda: {rng.choice(["role", "content", "type", "text", "k"]): odd_values(rng, depth + 1)
                              for _ in range(rng.randint(0, 3))}}
    names = list(kinds) if depth < 3 else list(kinds)[:8]
    return kinds[rng.choice(names)]()


def test_every_malformed_body_gets_a_4xx(tiny_ckpt):
    """Deeply nested JSON, bad UTF-8, lone surrogates, huge numbers, NaN, and 300 requests whose fields hold values
    of random types: each gets a 4xx with an OpenAI-style error body, and the server keeps serving."""
    import random

    srv, _, _ = start(tiny_ckpt)
    try:
        cases = [b"[" * 100_000 + b"]" * 100_000, b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                 b"\xff\xfe{}", b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
                 b'{"\\ud800": 1}', b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}',
                 b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', b"", b"null", b"[]",
                 b'{"messages": [{"role": "user", "content": "hi"}], "n": 100000000000000000000000}']
        rng = random.Random(0)
        fields = ["messages", "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "seed", "stream",
                  "stream_options", "stop", "user"]
        for _ in range(300):
            body = {"messages": [{"role": "user", "content": "hi"}]}
            for f in rng.sample(fields, rng.randint(1, 3)):
                body[f] = odd_values(rng)
            if body.get("messages") == [{"role": "user", "content": "hi"}]:
                body["messages"] = odd_values(rng)
            cases.append(json.dumps(body).encode())
        for data in cases:
            status, body = raw_post(srv, data)
            assert 400 <= status < 500, (status, data[:200], body)
            assert set(body["error"]) == {"message", "type", "param", "code"}, body
        status, body = raw_post(srv, json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 4}).encode())
        assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
    finally:
        stop(srv)


def test_a_model_with_nan_weights_answers_5xx_not_a_reply(tiny_ckpt, tmp_path):
    """A broken model (NaN weights): the plain request gets a 500 naming the cause, the streamed one an error
    event instead of any text; both decode paths."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(tiny_ckpt, bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    for path in ("eager", "static"):
        os.environ["PSYCHE_SAMPLER"] = path
        srv, _, _ = start(bad)
        try:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
            status, answer = raw_post(srv, json.dumps(body).encode())
            assert status == 500 and "not finite" in answer["error"]["message"], (path, status, answer)
            _, resp = post(srv, {**body, "stream": True})
            events, done = read_events(resp)
            assert done and "not finite" in events[-1]["error"]["message"], (path, events)
            assert all(e.get("choices", [{}])[0].get("delta", {}).get("content", "") == "" for e in events[:-1])
        finally:
            stop(srv)
            del os.environ["PSYCHE_SAMPLER"]
