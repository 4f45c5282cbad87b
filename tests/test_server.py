"""The HTTP server (numba_apr/server) against a real one started here on 127.0.0.1 (tiny model,
CPU, 4 slots, an API key), through the official `openai` client and plain HTTP: streamed text
equals the non-streamed, chat templates, stop strings, usage, concurrent greedy requests each
getting what they get alone, a dropped stream freeing its slot, a bounded load test, Ollama's
routes, and every bad input's status. Every request has a time limit."""
import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from conftest import ROOT, SHARED  # noqa: E402

TINY = SHARED / "models" / "tiny-qwen2-q4km.gguf"
KEY = "test-key"
LIMIT = 60  # seconds for any one request


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "numba_apr.server", "-m", str(TINY), "--port", str(port),
                             "-np", "4", "-c", "1024", "--api-key", KEY, "--metrics"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # a cold Numba cache compiles the batch kernels first
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited: {proc.stderr.read()}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("server did not come up")
    yield base
    proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop, no traceback
    proc.wait(timeout=30)
    err = proc.stderr.read()
    assert "Traceback" not in err, err


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, timeout=LIMIT, max_retries=0)


def _auth():
    return {"Authorization": f"Bearer {KEY}"}


def _complete(client, prompt, **kw):
    kw.setdefault("temperature", 0)
    return client.completions.create(model="tiny-qwen2-q4km", prompt=prompt, **kw)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-qwen2-q4km"]
    assert httpx.get(server + "/health", timeout=LIMIT).json() == {"status": "ok"}


def test_stream_equals_whole(client):
    whole = _complete(client, "The capital of France is", max_tokens=24)
    streamed = "".join(c.choices[0].text for c in
                       _complete(client, "The capital of France is", max_tokens=24, stream=True))
    assert whole.choices[0].text == streamed and whole.usage.completion_tokens == 24
    assert whole.choices[0].finish_reason == "length"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    chat = client.chat.completions.create(model="tiny-qwen2-q4km", messages=msgs, max_tokens=16, temperature=0)
    parts = client.chat.completions.create(model="tiny-qwen2-q4km", messages=msgs, max_tokens=16, temperature=0,
                                           stream=True, stream_options={"include_usage": True})
    chunks = list(parts)
    assert chat.choices[0].message.content == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_chat_template_applied(client):
    import numba_apr
    m = numba_apr.load(TINY, n_ctx=64)
    msgs = [{"role": "user", "content": "Hello there"}]
    want = len(m.tokenize(m.chat_prompt(msgs), add_bos=True, special=True))
    r = client.chat.completions.create(model="tiny-qwen2-q4km", messages=msgs, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == want and want > 4  # the template's markup counted, not just the text


def test_stop_string(client):
    text = _complete(client, "Once upon a time", max_tokens=32).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = _complete(client, "Once upon a time", max_tokens=32, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_concurrent_greedy_requests_match_alone(client):
    prompts = [f"Story number {i}: once" for i in range(8)]
    alone = [_complete(client, p, max_tokens=20).choices[0].text for p in prompts]
    with cf.ThreadPoolExecutor(8) as ex:
        together = list(ex.map(lambda p: _complete(client, p, max_tokens=20).choices[0].text, prompts))
    assert together == alone


def test_next_turn_reuses_the_cached_prefix(server, client):
    """A chat's next turn starts with what a slot already holds: only the new tokens are read."""
    msgs = [{"role": "user", "content": "Tell me about the sea, at length, in many words please."}]
    first = client.chat.completions.create(model="tiny-qwen2-q4km", messages=msgs, max_tokens=8, temperature=0)
    before = _metric(server, "prompt_tokens_reused_total")
    msgs += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And the mountains?"}]
    second = client.chat.completions.create(model="tiny-qwen2-q4km", messages=msgs, max_tokens=8, temperature=0)
    reused = _metric(server, "prompt_tokens_reused_total") - before
    assert first.usage.prompt_tokens <= reused < second.usage.prompt_tokens


def test_logprobs(client):
    r = client.chat.completions.create(model="tiny-qwen2-q4km", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert abs(e.logprob - e.top_logprobs[0].logprob) < 1e-6  # greedy: the top token


def _metric(server, name):
    text = httpx.get(server + "/metrics", headers=_auth(), timeout=LIMIT).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(f"numba_apr:{name} ")))


def test_disconnect_frees_the_slot(server):
    body = {"prompt": "Tell me everything", "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers=_auth(), timeout=LIMIT) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    deadline = time.time() + 20
    while _metric(server, "requests_processing") and time.time() < deadline:
        time.sleep(0.2)
    assert _metric(server, "requests_processing") == 0


def test_load(client):
    """16 clients x 10 requests, each under a time limit: every one answered."""
    def one(i):
        r = _complete(client, f"Request {i}", max_tokens=4, temperature=0.7, seed=i)
        return r.usage.completion_tokens

    with cf.ThreadPoolExecutor(16) as ex:
        counts = list(ex.map(one, range(160), timeout=600))
    assert len(counts) == 160 and all(1 <= c <= 4 for c in counts)


def test_ollama_routes(server):
    h = _auth()
    r = httpx.post(server + "/api/generate", json={"model": "tiny-qwen2-q4km", "prompt": "Why is the sky blue?",
                                                   "stream": False, "options": {"temperature": 0, "num_predict": 8}},
                   headers=h, timeout=LIMIT).json()
    assert r["done"] and r["eval_count"] == 8 and r["prompt_eval_count"] > 0 and r["eval_duration"] > 0
    with httpx.stream("POST", server + "/api/chat", headers=h, timeout=LIMIT,
                      json={"messages": [{"role": "user", "content": "Hi"}], "options": {"temperature": 0,
                                                                                         "num_predict": 8}}) as s:
        lines = [json.loads(x) for x in s.iter_lines() if x]
    assert lines[-1]["done"] and lines[-1]["eval_count"] == 8 and not any(x["done"] for x in lines[:-1])
    tags = httpx.get(server + "/api/tags", headers=h, timeout=LIMIT).json()
    assert tags["models"][0]["name"] == "tiny-qwen2-q4km"


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", "/v1/completions", b"{not json", 400),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": -5}, 400),
    ("POST", "/v1/completions", {"prompt": 42}, 400),
    ("POST", "/v1/completions", {"prompt": "word " * 400}, 400),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, 400),
    ("POST", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404),
    ("GET", "/v1/nothing", None, 404),
    ("POST", "/api/generate", {"prompt": "x", "options": {"top_p": 5}}, 400),
])
def test_bad_input(server, method, path, body, status):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    r = httpx.request(method, server + path, headers=_auth(), timeout=LIMIT, **kw)
    assert r.status_code == status, r.text
    assert isinstance(r.json()["error"]["message"], str)


def test_api_key_required(server):
    r = httpx.post(server + "/v1/completions", json={"prompt": "x"}, timeout=LIMIT)
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.get(server + "/health", timeout=LIMIT).status_code == 200  # open, as llama-server's


def test_queue_full_is_503(server):
    """More requests than slots + waiting line: the rest are refused with 503, none lost."""
    body = {"prompt": "Keep going", "max_tokens": 48, "temperature": 0}

    def one(_):
        return httpx.post(server + "/v1/completions", json=body, headers=_auth(), timeout=LIMIT).status_code

    with cf.ThreadPoolExecutor(40) as ex:
        codes = list(ex.map(one, range(40)))
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) >= 4


def test_chat_page(server):
    page = httpx.get(server + "/", timeout=LIMIT).text
    assert "<html" in page and "/v1/chat/completions" in page


def test_chat_page_in_a_browser(server, tmp_path):
    """Headless Chromium (Debian's, installed by the README's test command): type, send, see the
    reply stream in."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        driver.set_page_load_timeout(LIMIT)
        driver.get(f"{server}/?key={KEY}")
        driver.find_element(By.ID, "input").send_keys("Hello there")
        driver.find_element(By.ID, "send").click()

        def replied(d):
            bubbles = d.find_elements(By.CSS_SELECTOR, ".assistant")
            return bubbles and bubbles[-1].text.strip() and d.find_element(By.ID, "status").text == ""
        WebDriverWait(driver, LIMIT).until(replied)
        assert driver.find_element(By.CSS_SELECTOR, ".user").text == "Hello there"
        assert driver.find_element(By.CSS_SELECTOR, ".assistant").text.strip()
    finally:
        driver.quit()
