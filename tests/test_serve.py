"""`psyche serve`: the OpenAI-compatible server on 127.0.0.1, through real HTTP."""

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from psyche.sampler import generate, row_seeds
from psyche.serve import make_server
from psyche.tokenizer import Tokenizer
from psyche.weights import load_pretrained


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    model, _ = load_pretrained(tiny_ckpt)
    tok = Tokenizer.from_dir(tiny_ckpt)
    srv = make_server(model, tok, "tiny", port=0, max_tokens=256, max_body=64 << 10, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, model, tok
    srv.shutdown()
    srv.server_close()
    srv.engine.stop()


def request(srv, method, path, body=None, raw=None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, resp.read().decode()
    conn.close()
    return out


def chat(srv, **body):
    status, text = request(srv, "POST", "/v1/chat/completions", body)
    return status, (json.loads(text) if not body.get("stream") or status != 200 else text)


def alone(model, tok, messages, max_tokens, temperature=0.0, seed=0):
    """What the sampler gives for this request on its own."""
    ids, _ = tok.encode_chat(messages, add_generation_prompt=True)
    r = generate(model, [ids], max_new_tokens=max_tokens, temperature=temperature, stop_token_ids=tok.stop_ids,
                 pad_id=tok.pad_id, seed=row_seeds(seed, 1))
    text = tok.decode(r.tokens[0, : r.lengths[0]].tolist(), skip_special_tokens=True)
    return text, "stop" if bool(r.finished[0]) else "length"


def sse(text):
    """SSE body -> list of decoded JSON events; asserts the stream ends with [DONE]."""
    events = [e[len("data: "):] for e in text.split("\n\n") if e.strip()]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_models_endpoint(served):
    srv, _, _ = served
    status, text = request(srv, "GET", "/v1/models")
    assert status == 200
    assert [m["id"] for m in json.loads(text)["data"]] == ["tiny"]


@pytest.mark.parametrize("path", ["eager", "static"])
def test_16_concurrent_requests_equal_each_alone(served, path, monkeypatch):
    """Batched requests (mixed lengths, limits and sampling settings) answer as each would alone, on either
    decode path (the static one streams and ends rows at its host syncs)."""
    monkeypatch.setenv("PSYCHE_SAMPLER", path)
    srv, model, tok = served
    jobs = []
    for i in range(16):
        msgs = [{"role": "user", "content": f"第{i}个问题：什么是焦虑？" * (1 + i % 3)}]
        # half greedy, half sampled with a seed (two temperatures: different sampling settings batch apart)
        temp = 0.0 if i % 2 == 0 else (0.8 if i % 4 == 1 else 1.0)
        jobs.append(dict(messages=msgs, max_tokens=4 + i, temperature=temp, seed=100 + i))
    results = [None] * 16
    barrier = threading.Barrier(16)
    calls_before = srv.engine.calls

    def worker(i):
        barrier.wait()
        results[i] = chat(srv, model="tiny", **jobs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for job, (status, body) in zip(jobs, results):
        assert status == 200, body
        want = alone(model, tok, job["messages"], job["max_tokens"], job["temperature"], job["seed"])
        choice = body["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"]) == want
        assert body["usage"]["completion_tokens"] <= job["max_tokens"]
    assert srv.engine.rows_max > 1  # requests really shared sampler batches
    assert srv.engine.calls - calls_before < 16


@pytest.mark.parametrize("path", ["eager", "static"])
def test_stream_equals_non_stream(served, path, monkeypatch):
    monkeypatch.setenv("PSYCHE_SAMPLER", path)
    srv, _, _ = served
    for body in (dict(max_tokens=24, temperature=0), dict(max_tokens=24, temperature=1.0, seed=7, n=2)):
        msgs = [{"role": "user", "content": "请解释认知行为疗法。"}]
        status, full = chat(srv, messages=msgs, **body)
        assert status == 200
        status, text = chat(srv, messages=msgs, stream=True, stream_options={"include_usage": True}, **body)
        assert status == 200
        events = sse(text)
        n = body.get("n", 1)
        pieces, finish = [""] * n, [None] * n
        for e in events:
            for c in e["choices"]:
                pieces[c["index"]] += c["delta"].get("content", "")
                finish[c["index"]] = c["finish_reason"] or finish[c["index"]]
        assert pieces == [c["message"]["content"] for c in full["choices"]]
        assert finish == [c["finish_reason"] for c in full["choices"]]
        assert events[-1]["usage"] == full["usage"]


BAD = [
    ("malformed JSON", b'{"messages": [', 400, "invalid_json"),
    ("not an object", b"[1, 2]", 400, None),
    ("unknown field", {"messages": [{"role": "user", "content": "x"}], "frequency_penalty": 1}, 400, "unknown_field"),
    ("unknown message field", {"messages": [{"role": "user", "content": "x", "foo": 1}]}, 400, "unknown_field"),
    ("missing messages", {"max_tokens": 3}, 400, "missing_field"),
    ("messages not a list", {"messages": "hello"}, 400, None),
    ("bad role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_value"),
    ("content not text", {"messages": [{"role": "user", "content": 3}]}, 400, "invalid_type"),
    ("temperature a string", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400,
     "invalid_type"),
    ("max_tokens a bool", {"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, 400, "invalid_type"),
    ("max_tokens a float", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2.5}, 400, "invalid_type"),
    ("absurd max_tokens", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 12}, 400,
     "invalid_value"),
    ("zero max_tokens", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "invalid_value"),
    ("temperature too small to divide by", {"messages": [{"role": "user", "content": "x"}], "temperature": 1e-38},
     400, "invalid_value"),
    ("temperature just below the smallest", {"messages": [{"role": "user", "content": "x"}], "temperature": 9e-6},
     400, "invalid_value"),
    ("n too large", {"messages": [{"role": "user", "content": "x"}], "n": 1000}, 400, "invalid_value"),
    ("stream not bool", {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, 400, "invalid_type"),
    ("stop strings", {"messages": [{"role": "user", "content": "x"}], "stop": ["\n"]}, 400, "unsupported"),
    ("over-long prompt", {"messages": [{"role": "user", "content": "焦虑 " * 3000}]}, 400, "context_length_exceeded"),
    ("prompt + max_tokens too long", {"messages": [{"role": "user", "content": "焦虑 " * 700}], "max_tokens": 256},
     400, "context_length_exceeded"),
    ("body too large", {"messages": [{"role": "user", "content": "x" * (70 << 10)}]}, 413, "request_too_large"),
    ("unknown model", {"messages": [{"role": "user", "content": "x"}], "model": "gpt-9"}, 404, "model_not_found"),
]


@pytest.mark.parametrize("what,body,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(served, what, body, status, code):
    srv, _, _ = served
    got, text = request(srv, "POST", "/v1/chat/completions", raw=body if isinstance(body, bytes) else None,
                        body=None if isinstance(body, bytes) else body)
    assert got == status, text
    err = json.loads(text)["error"]
    assert err["message"] and (code is None or err["code"] == code)
    ok, reply = chat(srv, messages=[{"role": "user", "content": "还在吗？"}], max_tokens=3, temperature=0)
    assert ok == 200 and reply["choices"][0]["message"]["content"] is not None


def test_a_tiny_temperature_is_refused_and_a_tiny_top_p_is_greedy(served):
    """temperature 1e-38 would overflow logits / temperature (a 500 blaming the weights, failing batch mates): a 400
    naming it. top_p 1e-50 (0 in fp32) keeps the most probable token: the greedy reply."""
    srv, model, tok = served
    msgs = [{"role": "user", "content": "你好"}]
    status, body = chat(srv, messages=msgs, max_tokens=8, temperature=1e-38)
    assert status == 400 and body["error"]["param"] == "temperature" and "temperature" in body["error"]["message"]
    status, body = chat(srv, messages=msgs, max_tokens=8, top_p=1e-50, seed=3)
    assert status == 200 and body["choices"][0]["message"]["content"] == alone(model, tok, msgs, 8)[0]


def test_wrong_route_and_missing_length(served):
    srv, _, _ = served
    assert request(srv, "GET", "/v2/nothing")[0] == 404
    assert request(srv, "POST", "/v1/completions", body={"prompt": "x"})[0] == 404
    with socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.0 411")
    assert chat(srv, messages=[{"role": "user", "content": "x"}], max_tokens=2)[0] == 200


def test_cli_serve_binds_loopback_and_answers(tiny_ckpt):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "psyche.cli", "serve", str(tiny_ckpt), "--port", "0", "--quiet",
                             "--model-name", "tiny"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        deadline = time.time() + 60
        while "serving" not in line and time.time() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "server exited"
        m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert m, line
        conn = http.client.HTTPConnection("127.0.0.1", int(m.group(1)), timeout=60)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(
            {"model": "tiny", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4, "temperature": 0}))
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        proc.terminate()
        proc.wait(30)
