#!/usr/bin/env python3
"""Scale-out measurement: the plain server beside the Ray Serve application, same client load.

    python scripts/bench_ray.py MODEL.gguf [--streams 4] [-n 64] [-r 5] [-np 4] [--ttft-rounds 7]

Measured one after the other on this machine, each alone (they would share the CPU otherwise):
  - `numba-apr serve` with one thread, and with every core's thread (the single-process way to
    use the machine);
  - `numba-apr serve --ray` on a Ray cluster started here (num_cpus = the cores), with 1 replica
    and with as many replicas as cores, one thread each.
Every configuration has the same slots (-np) per process. Load: `--streams` clients each send
one streaming /v1/completions request at once (greedy, ignore_eos, -n tokens): the aggregate is
all streams' tokens over the round's wall time. Time to first token: one stream alone, 16
tokens, `--ttft-rounds` times. Printed: median and range over the rounds, and the CPU.
Also printed per configuration: where the CPU time went during the aggregate rounds, by process
(from /proc: Ray's workers name themselves `ray::ServeReplica...`, `ray::ProxyActor`, ...).
Every request has a time limit; the Ray cluster is shut down at the end.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, ROOT)

from bench_serve import free_port, round_once, start  # noqa: E402


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by this process's descendants, summed by process name."""
    stats, children = {}, {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        stats[int(d)] = (name, (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK"))
        children.setdefault(int(rest[1]), []).append(int(d))
    out, todo = {}, [os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), []):
            name = stats[pid][0]
            name = "ray::ServeReplica" if name.startswith("ray::ServeRepl") else name
            out[name] = out.get(name, 0.0) + stats[pid][1]
            todo.append(pid)
    return out


def rounds(base, streams, n_gen, reps, ttft_reps, limit):
    round_once(base, 1, 8, limit)  # warm-up, then a first round at the batch size measured
    round_once(base, streams, 8, limit)
    before, t0 = cpu_seconds(), time.perf_counter()
    tps = [round_once(base, streams, n_gen, limit)[0] for _ in range(reps)]
    wall, after = time.perf_counter() - t0, cpu_seconds()
    used = sorted(((after[k] - before.get(k, 0.0), k) for k in after), reverse=True)
    print(f"    CPU during the {reps} aggregate rounds ({wall:.1f} s wall, {os.cpu_count()} cores): " +
          ", ".join(f"{k} {v:.1f} s" for v, k in used if v >= 0.05 * wall), file=sys.stderr, flush=True)
    ttft = [round_once(base, 1, 16, limit)[1] for _ in range(ttft_reps)]
    return tps, ttft


def measure(name, cmd, base, a, env=None):
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        proc = start(cmd, base)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        tps, ttft = rounds(base, a.streams, a.n_gen, a.repetitions, a.ttft_rounds, a.limit)
    finally:
        proc.terminate()  # the --ray command deletes its application (every replica) on SIGTERM
        proc.wait(timeout=120)
    print(f"  {name:28s} {a.streams} streams {statistics.median(tps):6.1f} tok/s ({min(tps):.1f}-{max(tps):.1f}), "
          f"first token {statistics.median(ttft) * 1e3:5.0f} ms ({min(ttft) * 1e3:.0f}-{max(ttft) * 1e3:.0f})",
          file=sys.stderr, flush=True)
    return tps, ttft


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("--ttft-rounds", type=int, default=7)
    ap.add_argument("-np", "--parallel", type=int, default=4, help="slots per server / replica")
    ap.add_argument("--n-ctx-slot", type=int, default=512, help="context per slot")
    ap.add_argument("--limit", type=float, default=300, help="seconds any one request may take")
    a = ap.parse_args()
    import logging

    import ray

    from numba_apr.packaged import resolve
    path = str(resolve(a.model))
    cores = os.cpu_count()
    common = ["-m", path, "-np", str(a.parallel), "-c", str(a.parallel * a.n_ctx_slot)]
    results = {}
    for threads in sorted({1, cores}):
        port = free_port()
        # NUMBA_NUM_THREADS too, as the replicas have it: no idle pool threads beside the -t ones.
        results[f"numba-apr serve -t {threads}"] = measure(
            f"numba-apr serve -t {threads}", [sys.executable, "-m", "numba_apr.server", *common, "-t", str(threads),
                                              "--port", str(port)],
            f"http://127.0.0.1:{port}", a, {"NUMBA_NUM_THREADS": str(threads)})
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    context = ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        port = free_port()  # Serve's proxy keeps the port it started with, for both runs
        for replicas in sorted({1, cores}):
            name = f"serve --ray, {replicas} replica{'s' if replicas > 1 else ''} x 1 thread"
            results[name] = measure(name, [sys.executable, "-m", "numba_apr.server", "--ray", "--address",
                                           context.address_info["gcs_address"], *common, "-t", "1", "--replicas",
                                           str(replicas), "--port", str(port)], f"http://127.0.0.1:{port}", a)
            time.sleep(2)  # the replicas' processes go before the next run
    finally:
        from ray import serve
        serve.shutdown()
        ray.shutdown()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"\nmodel {os.path.basename(path)}, {a.parallel} slots a process, {a.streams} streams x {a.n_gen} tokens "
          f"(greedy), CPU {cpu}, {cores} cores; median (range) of {a.repetitions} rounds, first token: 1 stream, "
          f"{a.ttft_rounds} rounds")
    print(f"| configuration | aggregate tok/s, {a.streams} streams | first token, 1 stream (ms) |")
    print("|---|---|---|")
    for name, (tps, ttft) in results.items():
        print(f"| {name} | {statistics.median(tps):.1f} ({min(tps):.1f}-{max(tps):.1f}) | "
              f"{statistics.median(ttft) * 1e3:.0f} ({min(ttft) * 1e3:.0f}-{max(ttft) * 1e3:.0f}) |")


if __name__ == "__main__":
    main()
