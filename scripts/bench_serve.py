#!/usr/bin/env python3
"""Serving under concurrent load: numba_apr's server beside llama.cpp's llama-server, same file.

    python scripts/bench_serve.py MODEL.gguf [-t 2] [--streams 1,2,4,8] [-n 64] [-r 2]
        [--llama-server ../shared/tools/llama.cpp-cpu/bin/llama-server] [--device cuda] [--engine]

Each server is started in turn on 127.0.0.1 with `-np` = the most streams (a slot each) and
measured alone (they would share the CPU otherwise). For each concurrency N, N clients each send
one streaming /v1/completions request at once (a short prompt, -n tokens, greedy, ignore_eos so
every stream generates all of them); a round's aggregate is all streams' generated tokens over
the round's wall time, and time to first token is each stream's wait for its first content
chunk. The median over -r rounds is printed, then the ratios. Every request has a time limit.
With --device cuda both run on the GPU (llama-server with -ngl 99). --engine also measures the
same load on the scheduler in this process, without HTTP (what the server's own overhead costs).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd, base, timeout=900):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: {cmd[0]} exited: {proc.stderr.read()[-400:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"error: {cmd[0]} did not come up in {timeout} s")


def stream_once(client, base, prompt, n_gen, limit):
    """(time to first token, tokens generated) of one streaming completion."""
    body = {"prompt": prompt, "max_tokens": n_gen, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, tokens = time.perf_counter(), None, 0
    with client.stream("POST", base + "/v1/completions", json=body, timeout=limit) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("choices") and ev["choices"][0].get("text") and first is None:
                first = time.perf_counter() - t0
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            elif ev.get("timings"):  # llama-server puts its counts in the last chunk
                tokens = ev["timings"].get("predicted_n", tokens)
    return first if first is not None else float("nan"), tokens


def round_once(base, n, n_gen, limit):
    prompts = [f"Request {i} of the benchmark: tell a long story about the number {i}." for i in range(n)]
    # Clients made before the clock starts: making one (its TLS context) takes 20-60 ms, which
    # the first token would otherwise carry.
    clients = [httpx.Client() for _ in range(n)]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(n) as ex:
        res = list(ex.map(lambda c, p: stream_once(c, base, p, n_gen, limit), clients, prompts))
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()
    return sum(t for _, t in res) / wall, statistics.median(f for f, _ in res)


def rounds(name, round_, streams, n_gen, reps):
    """{streams: (median tok/s, median first-token seconds)} of round_(n, tokens) at each n."""
    round_(1, 8)  # warm-up
    out = {}
    for n in streams:
        round_(n, 8)  # a first round of n: whatever this batch size compiles or captures
        res = [round_(n, n_gen) for _ in range(reps)]
        out[n] = (statistics.median(r[0] for r in res), statistics.median(r[1] for r in res))
        print(f"  {name:10s} {n} streams: {out[n][0]:7.1f} tok/s, first token {out[n][1] * 1e3:6.0f} ms",
              file=sys.stderr, flush=True)
    return out


def measure(name, cmd, base, streams, n_gen, reps, limit):
    proc = start(cmd, base)
    try:
        return rounds(name, lambda n, gen: round_once(base, n, gen, limit), streams, n_gen, reps)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def engine(path, device, threads, n_ctx_slot, streams, n_gen, reps):
    """The same rounds through the Scheduler in this process: no HTTP, no event loop."""
    import threading

    from numba_apr import load
    from numba_apr.sampling import SamplingParams
    from numba_apr.server.scheduler import Request, Scheduler
    model = load(path, device=device, n_ctx=n_ctx_slot, threads=threads, n_seq=max(streams))
    sched = Scheduler(model)

    def round_(n, gen):
        done, firsts, counts = threading.Semaphore(0), [None] * n, [0] * n
        t0 = time.perf_counter()
        for i in range(n):
            def sink(ev, i=i):
                if "token" in ev:
                    counts[i] += 1
                    if firsts[i] is None:
                        firsts[i] = time.perf_counter() - t0
                if ev.get("done") or "error" in ev:
                    done.release()
            ids = model.tokenize(f"Request {i} of the benchmark: tell a long story about the number {i}.")
            sched.submit(Request(ids, SamplingParams(temperature=0.0), gen, sink, ignore_eos=True))
        for _ in range(n):
            done.acquire()
        return sum(counts) / (time.perf_counter() - t0), statistics.median(firsts)

    try:
        return rounds("engine", round_, streams, n_gen, reps)
    finally:
        sched.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-r", "--repetitions", type=int, default=2)
    ap.add_argument("--n-ctx-slot", type=int, default=512, help="context per slot")
    ap.add_argument("--llama-server", default=None)
    ap.add_argument("--limit", type=float, default=300, help="seconds any one request may take")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--engine", action="store_true", help="also the scheduler alone, in this process")
    ap.add_argument("--json", help="results file: what it holds already is not measured again (so a "
                                   "second run can add llama.cpp's later), and each result is added to it")
    a = ap.parse_args()
    from numba_apr.packaged import resolve
    path = str(resolve(a.model))
    streams = [int(x) for x in a.streams.split(",")]
    np_, ctx = max(streams), max(streams) * a.n_ctx_slot
    results = {}
    if a.json and os.path.exists(a.json):
        results = {k: {int(n): tuple(v) for n, v in r.items()} for k, r in json.load(open(a.json)).items()}

    def keep(name, run):
        if name not in results:
            results[name] = run()
            if a.json:
                json.dump(results, open(a.json, "w"))

    port = free_port()
    keep("numba_apr", lambda: measure("numba_apr", [sys.executable, "-m", "numba_apr.server", "-m", path, "--port",
                                                 str(port), "-np", str(np_), "-c", str(ctx), "-t", str(a.threads),
                                                 "--device", a.device],
                                   f"http://127.0.0.1:{port}", streams, a.n_gen, a.repetitions, a.limit))
    if a.engine:
        keep("engine", lambda: engine(path, a.device, a.threads, a.n_ctx_slot, streams, a.n_gen, a.repetitions))
    if a.llama_server:
        from bench import usable_llama_bench
        exe = os.path.join(os.path.dirname(usable_llama_bench(os.path.join(os.path.dirname(a.llama_server),
                                                                            "llama-bench"))), "llama-server")
        port = free_port()
        keep("llama.cpp", lambda: measure("llama.cpp", [exe, "-m", path, "--host", "127.0.0.1", "--port", str(port),
                                                     "-np", str(np_), "-c", str(ctx), "-t", str(a.threads)]
                                       + (["-ngl", "99"] if a.device == "cuda" else []),
                                       f"http://127.0.0.1:{port}", streams, a.n_gen, a.repetitions, a.limit))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    gpu = ""
    if a.device == "cuda":
        from numba import cuda
        name = cuda.get_current_device().name
        gpu = f", GPU {name.decode() if isinstance(name, bytes) else name}"
    print(f"model {os.path.basename(path)}, threads {a.threads}, {a.n_gen} tokens a stream, CPU {cpu}{gpu}")
    ours = results["numba_apr"]
    head = "streams | numba_apr tok/s (first token ms)"
    print(head + (" | llama.cpp tok/s (first token ms) | ratio" if "llama.cpp" in results else ""))
    for n in streams:
        line = f"{n:7d} | {ours[n][0]:8.1f} ({ours[n][1] * 1e3:5.0f})"
        if "llama.cpp" in results:
            ll = results["llama.cpp"][n]
            line += f" | {ll[0]:8.1f} ({ll[1] * 1e3:5.0f}) | {ours[n][0] / ll[0]:.2f}x"
        if "engine" in results:
            e = results["engine"][n]
            line += f" | engine {e[0]:8.1f} ({e[1] * 1e3:5.0f})"
        print(line + f"   ({ours[n][0] / ours[streams[0]][0]:.2f}x of {streams[0]} stream)")


if __name__ == "__main__":
    main()
