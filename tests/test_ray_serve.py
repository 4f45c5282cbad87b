"""numba_apr.serve, the server as a Ray Serve application, on a Ray cluster started here.

One cluster for the module (head node only, 2 CPUs), one application deployed onto it through
`numba-apr serve --ray --address ...` (two CPU replicas of the tiny model, one thread and two
slots each), reached through Serve's HTTP proxy on 127.0.0.1: requests spread over both replicas,
concurrent SSE and NDJSON streams all complete with the text a replica gives that request, the official
`openai` client, the app's errors (and the proxy's, rewritten to the same JSON), one replica's
actor killed during a load run (every request answered or refused with an error, none lost; the
replica back within a bound), and stopping the application freeing every replica; last, the
cluster's shutdown leaving no process behind. Before those, without a cluster: the builder's
arguments and the CLI's one-line errors, the serve config file, and the proxies' failover
middleware against scripted ASGI apps. Every request and every wait has a time limit.
"""
import asyncio
import concurrent.futures as cf
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx
import openai
import pytest
import ray
import yaml
from conftest import ROOT, SHARED  # noqa: E402

with warnings.catch_warnings():  # Ray Serve's pydantic models warn on import; not ours to fix
    warnings.simplefilter("ignore", DeprecationWarning)
    from ray import serve

from numba_apr.errors import NumbaAprError
from numba_apr.serve import (
    APP_NAME,
    DEPLOYMENT_NAME,
    REPLICA_HEADER,
    TRIES_HEADER,
    ReplicaFailover,
)
from numba_apr.server.ray_serve import build_app, deployment_options, options

TINY = SHARED / "models" / "tiny-qwen2-q4km.gguf"
LIMIT = 60          # seconds for any one request
BACK_WITHIN = 60    # seconds for Serve to replace a killed replica
# The tiny model's greedy path from "Hi" keeps its top two logits >= 0.03 apart for 128 tokens
# ("Once upon a time": 0.004 at token 43), far above the 1e-6..1e-2 by which a kernel compiled in
# the process and the same loaded from Numba's cache can differ (see _references).
PROMPT = "Hi"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "numba_apr.server", "--ray", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


# -- without a cluster -------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    ({"parallel": 0}, "parallel must be an integer from 1 to 64"),
    ({"parallel": "two"}, "parallel must be an integer"),
    ({"replicas": 2, "max_replicas": 3}, "not both"),
    ({"min_replicas": 2}, "needs max-replicas"),
    ({"min_replicas": 3, "max_replicas": 2}, "max-replicas must be an integer from 3"),
    ({"target_ongoing_requests": 9, "parallel": 4}, "target-ongoing-requests must be a number from 0.01 to 4"),
    ({"model": "/no/such/model.gguf"}, "model file not found"),
    ({"device": "tpu"}, "device must be cpu or cuda"),
    ({"slots": 4}, "unknown argument(s) slots"),
])
def test_bad_arguments(args, message):
    with pytest.raises(NumbaAprError, match=message.replace("(", r"\(").replace(")", r"\)")):
        options({"model": str(TINY), **args})


def test_deployment_options():
    """Slots set the replica's max_ongoing_requests; threads its CPUs and Numba's thread pool;
    the string arguments of `serve run ... key=value` are read as numbers."""
    fixed = deployment_options(options({"model": str(TINY), "parallel": "3", "threads": "2", "replicas": "5"}))
    assert fixed["num_replicas"] == 5 and fixed["max_ongoing_requests"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"]["num_cpus"] == 2
    assert fixed["ray_actor_options"]["runtime_env"]["env_vars"]["NUMBA_NUM_THREADS"] == "2"
    assert fixed["max_queued_requests"] == 4 * 3 * 5
    auto = deployment_options(options({"model": str(TINY), "parallel": 4, "min_replicas": 1, "max_replicas": 6,
                                       "target_ongoing_requests": 3}))
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 6, "target_ongoing_requests": 3}
    assert "num_replicas" not in auto and auto["max_ongoing_requests"] == 4
    gpu = deployment_options(options({"model": str(TINY), "device": "cuda", "parallel": 1}))
    assert gpu["ray_actor_options"]["num_gpus"] == 1
    for args in ({"replicas": 2}, {"min_replicas": 1, "max_replicas": 3}, {"max_replicas": "2"}):
        assert isinstance(build_app({"model": str(TINY), **args}), serve.Application)


def test_cli_errors_are_one_line():
    for flags, message in [(["-m", str(TINY), "--replicas", "2", "--max-replicas", "3"], "not both"),
                           (["-m", str(ROOT / "README.md")], "not a GGUF file"),
                           (["-m", str(TINY), "--replicas", "many"], "argument --replicas: invalid int value")]:
        r = _cli(*flags)
        assert r.returncode != 0 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_capacity_check():
    from numba_apr.server.ray_serve import _capacity
    two = [{"Resources": {"CPU": 2.0}}]
    assert _capacity(options({"model": str(TINY), "replicas": 2}), two) == (None, None)
    assert "hold 2 of the 3 replicas" in _capacity(options({"model": str(TINY), "replicas": 3}), two)[1]
    assert "no node of the cluster has 4 CPUs" in _capacity(options({"model": str(TINY), "threads": 4}), two)[0]
    assert "and a GPU" in _capacity(options({"model": str(TINY), "device": "cuda", "parallel": 1}), two)[0]


def test_serve_config_file():
    """docs/serve_config.yaml is a valid Serve config whose application arguments check out."""
    from ray.serve.schema import ServeDeploySchema
    config = yaml.safe_load((ROOT / "docs" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "numba_apr.serve:build_app"
    deployment_options(options(app["args"]))


def test_failover_knows_the_apps_routes():
    from numba_apr.server.app import create_app
    from numba_apr.server.ray_serve import ROUTES
    assert {r.path for r in create_app(None).routes} == ROUTES


def _run_asgi(middleware, body=b'{"prompt": "x"}'):
    """Send one POST through `middleware`; (status, headers, body bytes, complete?)."""
    sent, inbox = [], [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if inbox:
            return inbox.pop(0)
        await asyncio.sleep(3600)  # the client stays

    async def send(m):
        sent.append(m)

    asyncio.run(middleware({"type": "http", "path": "/v1/completions", "method": "POST"}, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    return (start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in bodies),
            not bodies[-1].get("more_body", False))


def _scripted(*scripts):
    """An ASGI app standing in for Serve's proxy: call i sends scripts[i]'s messages, then returns."""
    calls = []

    async def app(scope, receive, send):
        calls.append((await receive())["body"])
        for m in scripts[len(calls) - 1]:
            await send(m)
    return app, calls


START = {"type": "http.response.start", "status": 200,
         "headers": [(b"content-type", b"text/event-stream"), (REPLICA_HEADER.encode(), b"r1")]}


def test_failover_resends_what_no_replica_answered():
    whole = [{**START, "headers": [(b"content-type", b"application/json"), (REPLICA_HEADER.encode(), b"r2")]},
             {"type": "http.response.body", "body": b'{"ok": 1}', "more_body": False}]
    app, calls = _scripted([], [START], whole)  # dies before answering; dies after its headers only; answers
    status, headers, body, complete = _run_asgi(ReplicaFailover(app, wait=0.01))
    assert (status, body, complete) == (200, b'{"ok": 1}', True) and headers[REPLICA_HEADER.encode()] == b"r2"
    assert headers[TRIES_HEADER.encode()] == b"3"
    assert calls == [b'{"prompt": "x"}'] * 3  # the same body each time


def test_failover_ends_a_cut_stream_with_an_error_event():
    chunk = {"type": "http.response.body", "body": b'data: {"choices": [{"text": "Once"}]}\n\n', "more_body": True}
    app, calls = _scripted([START, chunk])
    status, _, body, complete = _run_asgi(ReplicaFailover(app, wait=0.01))
    events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]
    assert status == 200 and complete and len(calls) == 1  # a started stream is not sent again
    assert events[0]["choices"][0]["text"] == "Once" and "stopped" in events[-1]["error"]["message"]


def test_failover_gives_up_with_a_json_503():
    app, calls = _scripted([], [], [])
    status, headers, body, complete = _run_asgi(ReplicaFailover(app, tries=3, wait=0.01))
    assert status == 503 and complete and len(calls) == 3 and headers[b"retry-after"] == b"1"
    assert "no replica finished" in json.loads(body)["error"]["message"]


def test_failover_rewrites_the_proxys_errors_as_json():
    busy = [{"type": "http.response.start", "status": 503,
             "headers": [(b"content-type", b"text/plain"), (b"retry-after", b"2")]},
            {"type": "http.response.body", "body": b"Request dropped due to backpressure", "more_body": False}]
    app, _ = _scripted(busy)
    status, headers, body, _ = _run_asgi(ReplicaFailover(app))
    err = json.loads(body)["error"]
    assert status == 503 and err["type"] == "server_busy" and "backpressure" in err["message"]
    assert headers[b"retry-after"] == b"2"


# -- on a cluster ------------------------------------------------------------------------------
def _descendants(pid):
    """Processes below `pid` (from /proc), each as (pid, start time) so a reused id is not mistaken."""
    children = {}
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if d.name.isdigit() and stat[0] != "Z":
            children.setdefault(int(stat[1]), []).append((int(d.name), stat[19]))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child[0])
    return out


def _alive(procs):
    left = set()
    for pid, start in procs:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[0] != "Z" and stat[19] == start:
            left.add(pid)
    return left


@pytest.fixture(scope="module")
def cluster():
    """A Ray cluster of this machine (head node only), shut down at the end: no process left."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    yield context
    procs = _descendants(os.getpid())
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
    deadline = time.time() + 30
    while _alive(procs) and time.time() < deadline:
        time.sleep(0.5)
    assert not _alive(procs), f"processes left after ray.shutdown(): {_alive(procs)}"


@pytest.fixture(scope="module")
def app(cluster):
    """`numba-apr serve --ray` onto the cluster: 2 replicas x 2 slots x 1 thread, through the
    proxy on 127.0.0.1 (its errors rewritten by proxy_middlewares, set by the CLI's job)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "numba_apr.server", "--ray", "--address",
                             cluster.address_info["gcs_address"], "-m", str(TINY), "-np", "2", "-c", "1024", "-t", "1",
                             "--replicas", "2", "--port", str(port), "--metrics"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # a cold Numba cache compiles the batch kernels first
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"numba-apr serve --ray exited: {proc.stderr.read()}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the application did not come up")
    yield {"base": base, "proc": proc, "names": set()}
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def _complete(base, prompt=PROMPT, n=24, **extra):
    r = httpx.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0,
                                                    "ignore_eos": True, **extra}, timeout=LIMIT)
    r.raise_for_status()
    return r.json()["choices"][0]["text"], r.headers[REPLICA_HEADER]


def _sse(base, prompt=PROMPT, n=24, on_start=None):
    """A streamed completion: ('answered', text) | ('refused', message) | ('lost', why); on_start
    gets the response's headers."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=LIMIT) as r:
            if r.status_code != 200:
                return "refused", json.loads(r.read())["error"]["message"]
            if on_start:
                on_start(r.headers)
            text, usage, done = [], None, False
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    return "refused", ev["error"]["message"]
                text += [c["text"] for c in ev["choices"]]
                usage = ev.get("usage") or usage
            if done and usage and usage["completion_tokens"] == n:
                return "answered", "".join(text)
            return "lost", f"ended without [DONE] or short: {usage}"
    except (httpx.HTTPError, ValueError, KeyError) as e:
        return "lost", f"{type(e).__name__}: {e}"


def _ndjson(base, prompt=PROMPT, n=24, on_start=None):
    body = {"prompt": prompt, "raw": True, "options": {"temperature": 0, "num_predict": n}}
    try:
        with httpx.stream("POST", base + "/api/generate", json=body, timeout=LIMIT) as r:
            if r.status_code != 200:
                return "refused", json.loads(r.read())["error"]["message"]
            if on_start:
                on_start(r.headers)
            lines = [json.loads(x) for x in r.iter_lines() if x]
        if "error" in lines[-1]:
            return "refused", lines[-1]["error"]
        if lines[-1].get("done"):
            return "answered", "".join(x.get("response", "") for x in lines)
        return "lost", "ended without done"
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        return "lost", f"{type(e).__name__}: {e}"


def _whole(base, prompt=PROMPT, n=24, on_start=None):
    try:
        r = httpx.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0,
                                                        "ignore_eos": True}, timeout=LIMIT)
        if on_start:
            on_start(r.headers)
        if r.status_code != 200:
            return "refused", r.json()["error"]["message"]
        if r.json()["usage"]["completion_tokens"] == n:
            return "answered", r.json()["choices"][0]["text"]
        return "lost", f"short: {r.json()['usage']}"
    except (httpx.HTTPError, ValueError, KeyError) as e:
        return "lost", f"{type(e).__name__}: {e}"


def test_cli_refuses_what_the_cluster_cannot_hold(cluster):
    r = _cli("--address", cluster.address_info["gcs_address"], "-m", str(TINY), "-t", "4")
    assert r.returncode == 1 and r.stderr.startswith("error: no node of the cluster has 4 CPUs"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _references(base, n):
    """What the replicas answer for PROMPT, greedy, n tokens: {kind: set of texts}, from 4 requests
    at once per API (2 slots x 2 replicas: both answer). The replicas are separate processes, and
    a kernel compiled in a process and the same loaded from Numba's cache give logits that differ
    in the last bits (measured with a cold cache: up to 0.008 in a log-probability within 40
    tokens of 'Once upon a time', which then turns to '衅' at token 44 in one process and 45 in
    the other; about 5e-7 from PROMPT): so a stream is checked against what the replicas give."""
    def completion(_):
        return _complete(base, n=n)[0]

    def ollama(_):
        return httpx.post(base + "/api/generate", json={"prompt": PROMPT, "raw": True, "stream": False,
                                                        "options": {"temperature": 0, "num_predict": n}},
                          timeout=LIMIT).json()["response"]
    with cf.ThreadPoolExecutor(4) as ex:
        texts = set(ex.map(completion, range(4), timeout=4 * LIMIT))
        ollama_texts = set(ex.map(ollama, range(4), timeout=4 * LIMIT))
    return {"sse": texts, "whole": texts, "ndjson": ollama_texts}


def test_requests_spread_over_both_replicas(app):
    """8 at once against 2 replicas of 2 slots (max_ongoing_requests 2): both serve, and each
    gives every request of the same prompt the same greedy text."""
    with cf.ThreadPoolExecutor(8) as ex:
        out = list(ex.map(lambda _: _complete(app["base"]), range(8), timeout=4 * LIMIT))
    names = {name for _, name in out}
    app["names"] |= names
    assert len(names) == 2 and all(name.startswith("SERVE_REPLICA::") for name in names)
    assert all(len({text for text, n in out if n == name}) == 1 for name in names)


def test_concurrent_streams_all_complete(app):
    """12 streams at once (SSE and NDJSON through the proxy), more than the 4 slots: every one
    ends complete, with the text a replica gives the same request made without streaming."""
    base = app["base"]
    ref = _references(base, 32)
    with cf.ThreadPoolExecutor(12) as ex:
        sse = [ex.submit(_sse, base, n=32) for _ in range(8)]
        nd = [ex.submit(_ndjson, base, n=32) for _ in range(4)]
        results = [f.result(timeout=4 * LIMIT) for f in sse + nd]
    assert [r[0] for r in results] == ["answered"] * 12, results
    assert all(r[1] in ref["sse"] for r in results[:8]) and all(r[1] in ref["ndjson"] for r in results[8:])


def test_openai_client_through_the_proxy(app):
    client = openai.OpenAI(base_url=app["base"] + "/v1", api_key="none", timeout=LIMIT, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-qwen2-q4km"]
    whole = client.completions.create(model="tiny-qwen2-q4km", prompt=PROMPT, max_tokens=16, temperature=0)
    parts = client.completions.create(model="tiny-qwen2-q4km", prompt=PROMPT, max_tokens=16, temperature=0,
                                      stream=True)
    assert whole.choices[0].text == "".join(c.choices[0].text for c in parts)
    msgs = [{"role": "user", "content": "Name a color."}]
    chat = client.chat.completions.create(model="tiny-qwen2-q4km", messages=msgs, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny-qwen2-q4km", messages=msgs, max_tokens=8,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chat.choices[0].message.content == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", "/v1/completions", b"{not json", 400),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400),
    ("POST", "/v1/completions", {"prompt": "word " * 600}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404),
    ("GET", "/v1/nothing", None, 404),
])
def test_errors_through_the_proxy(app, method, path, body, status):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    r = httpx.request(method, app["base"] + path, timeout=LIMIT, **kw)
    assert r.status_code == status and isinstance(r.json()["error"]["message"], str), r.text


def test_full_queue_is_a_json_503(app):
    """40 at once: 4 in the slots, 16 in the proxy's queue (4 per slot), the rest refused by
    the proxy with 503, in the app's JSON error shape; none lost."""
    def one(_):
        r = httpx.post(app["base"] + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                                                               "ignore_eos": True}, timeout=LIMIT)
        return r.status_code, r.json()
    with cf.ThreadPoolExecutor(40) as ex:
        out = list(ex.map(one, range(40), timeout=4 * LIMIT))
    codes = [c for c, _ in out]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) >= 4, codes
    assert all(body["error"]["type"] == "server_busy" for c, body in out if c == 503)


def test_replica_killed_during_load(app):
    """One replica's actor killed while 12 requests (SSE, NDJSON, whole) run and wait: each ends
    answered in full (the text a replica gives that request) or refused with an error message; none
    lost; the other replica's requests untouched; Serve starts a replacement within BACK_WITHIN."""
    base = app["base"]
    n = 128
    ref = _references(base, n)
    started, on, tries = [], {}, {}  # SSE replicas as streams start; each request's replica and tries
    kinds = ["whole"] * 3 + ["sse"] * 6 + ["ndjson"] * 3  # the whole ones first: one on each replica

    def call(i, kind):
        def seen(headers):
            on[i], tries[i] = headers.get(REPLICA_HEADER), int(headers.get(TRIES_HEADER, 1))
            if kind == "sse":
                started.append(on[i])
        return {"sse": _sse, "ndjson": _ndjson, "whole": _whole}[kind](base, n=n, on_start=seen)
    with cf.ThreadPoolExecutor(len(kinds)) as ex:
        futures = [ex.submit(call, i, k) for i, k in enumerate(kinds[:3])]
        time.sleep(0.3)  # (so the victim most likely holds one, still generating: it is sent again)
        futures += [ex.submit(call, i + 3, k) for i, k in enumerate(kinds[3:])]
        deadline = time.time() + LIMIT
        while not started and time.time() < deadline:
            time.sleep(0.05)
        assert started, "no stream started"
        time.sleep(0.2)  # a few tokens in
        victim = started[0]
        killed_at = time.time()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        results = [f.result(timeout=4 * LIMIT) for f in futures]
    answered = [k for k, r in zip(kinds, results) if r[0] == "answered"]
    refused = [r[1] for r in results if r[0] == "refused"]
    lost = [r[1] for r in results if r[0] == "lost"]
    assert not lost, lost
    wrong = [(k, on.get(i), tries.get(i), r[1], ref[k]) for i, (k, r) in enumerate(zip(kinds, results))
             if r[0] == "answered" and r[1] not in ref[k]]
    assert not wrong, wrong  # answered means in full: the text a replica gives that request
    assert all(isinstance(m, str) and m for m in refused)
    # The other replica's requests are untouched (a resent one was the victim's first).
    assert all(results[i][0] == "answered" for i, name in on.items() if name != victim)
    resent = sum(t > 1 for t in tries.values())
    # Serve starts a replacement; the application is whole again (2 replicas answering).
    names = set()
    while time.time() < killed_at + BACK_WITHIN:
        deployment = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
        if deployment.replica_states.get("RUNNING") == 2:
            with cf.ThreadPoolExecutor(4) as ex:
                names = {name for _, name in ex.map(lambda _: _complete(base, n=8), range(4), timeout=LIMIT)}
            if len(names) == 2:
                break
        time.sleep(0.5)
    back = time.time() - killed_at
    assert len(names) == 2 and victim not in names, f"not back within {BACK_WITHIN} s: {names}"
    app["names"] |= names | {victim}
    print(f"\nfault test: sent {len(kinds)}, answered {len(answered)} ({resent} of them resent to the other "
          f"replica), refused {len(refused)} ({refused[:1]}), lost {len(lost)}; replica back (2 answering) "
          f"{back:.1f} s after the kill")


def test_stopping_frees_every_replica(app):
    """Ctrl-C on `numba-apr serve --ray`: the application is deleted and its replicas' actors
    are gone; the command exits 0 without a traceback."""
    proc = app["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0
    err = proc.stderr.read()
    assert "Traceback" not in err and "every replica freed" in err, err
    assert APP_NAME not in serve.status().applications
    for name in app["names"]:
        with pytest.raises(ValueError):
            ray.get_actor(name, namespace="serve")
