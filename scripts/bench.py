#!/usr/bin/env python3
"""llama-bench's two measures for numba_apr, optionally side by side with llama.cpp.

    python scripts/bench.py MODEL.gguf -p 128 -n 64 -r 3 [--llama-bench PATH/llama-bench]

`pp N`: a prompt of N random tokens evaluated as one batch on an empty context (tok/s).
`tg N`: N tokens decoded one at a time after a one-token context (tok/s), like llama-bench.
With --llama-bench, llama.cpp runs on the same file with the same thread count, one repetition
of each engine in turn (interleaved, so both see the same machine state), and the table
gives the ratio. The machine's read bandwidth is measured too (as anchors.md does), and decode is
shown as GB/s of weights streamed and as a fraction of it. Each of our repetitions runs in its own process (load, warm-up, pp, tg), so
our worker threads, which spin between kernels (see numba_apr/_numba.py), are gone while
llama.cpp runs. Also printed: load time, peak RSS, and decode as GB/s of weights streamed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np


def ours_once(model, n_prompt, n_gen, rng):
    if model.device == "cuda":
        return ours_once_cuda(model, n_prompt, n_gen, rng)
    out = {}
    if n_prompt:
        ids = rng.integers(0, model.config.n_vocab, n_prompt).astype(np.int32)
        t = time.perf_counter()
        model._eval(ids, 0)
        out["pp"] = n_prompt / (time.perf_counter() - t)
    if n_gen:
        model._eval(np.array([model.tokenizer.bos_id or 0], np.int32), 0)
        toks = rng.integers(0, model.config.n_vocab, n_gen)
        t = time.perf_counter()
        for tok in toks:
            model._decode(int(tok))
        out["tg"] = n_gen / (time.perf_counter() - t)
    return out


def ours_once_cuda(model, n_prompt, n_gen, rng):
    """pp: the prompt in batches of n_batch, timed to the device's completion. tg: greedy steps,
    each one replay of the decode graph with the argmax on the device and the id back to the host
    (llama-bench's tg does not even sample: this is the stricter measure)."""
    from numba_apr.model.cuda import CudaStepper
    from numba_apr.sampling import SamplingParams

    runner, out = model.runner, {}
    if n_prompt:
        ids = rng.integers(0, model.config.n_vocab, n_prompt).astype(np.int32)
        runner.stream.synchronize()
        t = time.perf_counter()
        model._eval(ids, 0, host=False)
        runner.stream.synchronize()
        out["pp"] = n_prompt / (time.perf_counter() - t)
    if n_gen:
        step = getattr(model, "_bench_stepper", None)
        if step is None:  # one stepper (one captured graph) per process, as in generation
            step = model._bench_stepper = CudaStepper(model, SamplingParams(temperature=0.0))
        tok = step.first([model.tokenizer.bos_id or 0])
        t = time.perf_counter()
        for _ in range(n_gen):
            tok = step.next(tok)
        out["tg"] = n_gen / (time.perf_counter() - t)
    return out


def gpu_copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Device-to-device copy on the GPU, bytes read + written per second (GB/s), best of a few:
    what anchors.md quotes for the H100 (about 3.0 TB/s)."""
    from numba import cuda

    a = cuda.device_array(int(gib * 2**30) // 4, np.int32)
    b = cuda.device_array_like(a)
    b.copy_to_device(a)
    cuda.synchronize()
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_to_device(a)
        cuda.synchronize()
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def read_bandwidth(gib: float = 1.0, repeats: int = 3) -> tuple[float, float]:
    """This machine's memory read bandwidth (GB/s), best of a few passes of an int32 sum over
    1 GiB, one contiguous chunk per thread: (as anchors.md measures it, the same sum asking for
    each cache line 8 KiB ahead as our kernels do). On a VM whose hardware prefetch is weak the
    second is much the higher."""
    import numba

    from numba_apr.kernels.cpu.simd import prefetch

    @numba.njit(parallel=True, cache=True)
    def chunk_sums(a, n_chunks, ahead):
        out = np.zeros(n_chunks, np.int64)
        for c in numba.prange(n_chunks):
            lo, hi = c * a.size // n_chunks // 16 * 16, (c + 1) * a.size // n_chunks // 16 * 16
            s = np.int32(0)
            for i in range(lo, hi, 16):
                if ahead:
                    prefetch(a, i + 2048)
                for j in range(16):
                    s += a[i + j]
            out[c] = s
        return out

    a = np.ones(int(gib * 2**30) // 4, np.int32)
    n = numba.get_num_threads()
    best = [0.0, 0.0]
    for k, ahead in enumerate((False, True)):
        chunk_sums(a, n, ahead)
        for _ in range(repeats):
            t = time.perf_counter()
            chunk_sums(a, n, ahead)
            best[k] = max(best[k], a.nbytes / (time.perf_counter() - t) / 1e9)
    return best[0], best[1]


def usable_llama_bench(path: str, cpu_level: str | None = None) -> str:
    """llama-bench ready to run. The copy in ../shared/tools stores its library symlinks as small
    text files, and its sapphirerapids back-end dies with an illegal instruction on some VMs; so
    the folder is copied once into the cache with real links and without that back-end.
    `cpu_level` (e.g. `haswell`: AVX2) keeps only that CPU back-end, so that llama.cpp runs the
    same instruction-set level as a forced NUMBA_APR_SIMD on a CPU that has more."""
    from numba_apr.packaged import cache_dir

    src = os.path.dirname(os.path.abspath(path))
    dst = cache_dir() / ("llama.cpp-bin" + (f"-{cpu_level}" if cpu_level else ""))
    if cpu_level and not os.path.exists(os.path.join(src, f"libggml-cpu-{cpu_level}.so")):
        sys.exit(f"error: {src} has no libggml-cpu-{cpu_level}.so")
    if not (dst / "llama-bench").exists():
        dst.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(src):
            f, out = os.path.join(src, name), dst / name
            other_cpu = cpu_level and name.startswith("libggml-cpu-") and name != f"libggml-cpu-{cpu_level}.so"
            if "sapphirerapids" in name or other_cpu or out.exists() or out.is_symlink():
                continue
            if os.path.getsize(f) < 64 and name.startswith("lib"):  # a link stored as text
                os.symlink(open(f).read().strip(), out)
            else:
                shutil.copy2(f, out)
    return str(dst / "llama-bench")


def llama_once(exe, path, n_prompt, n_gen, threads, device="cpu"):
    res = {}
    for kind, n in (("pp", n_prompt), ("tg", n_gen)):
        if not n:
            continue
        args = [exe, "-m", str(path), "-t", str(threads), "-r", "1", "-o", "json",
                "-p", str(n if kind == "pp" else 0), "-n", str(n if kind == "tg" else 0)]
        args += ["-ngl", "99"] if device == "cuda" else []
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"error: llama-bench failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        res[kind] = json.loads(r.stdout)[0]["avg_ts"]
    return res


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads (every matrix once; one embedding row)."""
    if model.device == "cuda":
        return model.runner.w.nbytes
    w = model.weights

    def size(t):  # a repacked matrix or raw GGUF rows
        return t.data.nbytes if hasattr(t, "data") else t.raw.nbytes
    n = sum(size(t) for L in w.layers for t in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down))
    return n + size(w.output)


def one_repetition(path, a) -> dict:
    """Load, warm up, and measure pp and tg once (run in a child process)."""
    import numba_apr

    t = time.perf_counter()
    model = numba_apr.load(path, n_ctx=max(a.n_prompt, a.n_gen + 1, 16), threads=a.threads, device=a.device)
    load_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    ours_once(model, a.n_prompt, 2, rng)  # warm-up: the same prompt size, as llama-bench does
    out = ours_once(model, a.n_prompt, a.n_gen, rng)
    out.update(load_s=load_s, rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               gb=weight_bytes(model) / 1e9)
    return out


def cpu_name() -> str:
    """The CPU's model name as Linux reports it (what lscpu prints)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def fmt(xs):
    return f"{statistics.mean(xs):8.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:5.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    ap.add_argument("--llama-bench", default=None, help="path of llama.cpp's llama-bench")
    ap.add_argument("--llama-cpu", default=None, metavar="LEVEL",
                    help="run only this llama.cpp CPU back-end (haswell = AVX2, zen4, ...)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: our GPU backend, and llama-bench with -ngl 99 (a CUDA build)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child: one repetition
    a = ap.parse_args()

    from numba_apr.packaged import resolve

    path = resolve(a.model)
    if a.one:  # one repetition of ours, in this (child) process: print it as JSON
        print(json.dumps(one_repetition(path, a)))
        return
    if a.llama_bench and a.device == "cpu":
        a.llama_bench = usable_llama_bench(a.llama_bench, a.llama_cpu)
    ours, theirs = {"pp": [], "tg": []}, {"pp": [], "tg": []}
    runs = []
    for _ in range(a.repetitions):
        r = subprocess.run([sys.executable, __file__, path, "-p", str(a.n_prompt), "-n", str(a.n_gen),
                            "-t", str(a.threads), "--device", a.device, "--one"], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"error: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        for k in ("pp", "tg"):
            if k in runs[-1]:
                ours[k].append(runs[-1][k])
        if a.llama_bench:
            for k, v in llama_once(a.llama_bench, path, a.n_prompt, a.n_gen, a.threads, a.device).items():
                theirs[k].append(v)

    load_s, rss, gb = min(r["load_s"] for r in runs), max(r["rss_mib"] for r in runs), runs[0]["gb"]
    print(f"model {os.path.basename(path)}  ({os.path.getsize(path) / 2**20:.0f} MiB, "
          f"{gb:.3f} GB of weights per decode step), " + ("GPU" if a.device == "cuda" else f"threads {a.threads}"))
    if a.device == "cpu":
        from numba_apr.kernels.cpu.isa import LEVEL
        print(f"CPU {cpu_name()}, numba_apr level {LEVEL}"
              + (f", llama.cpp back-end {a.llama_cpu}" if a.llama_cpu else ""))
    if a.device == "cuda":
        copy = gpu_copy_bandwidth()
        bw, bw_name = (copy, copy), "of the device copy bandwidth"
        print(f"load {load_s:.2f} s, peak RSS {rss:.0f} MiB; device-to-device copy {copy:.0f} GB/s "
              "(read + written)")
    else:
        bw, bw_name = read_bandwidth(), "of the prefetching sum"
        print(f"load {load_s:.2f} s, peak RSS {rss:.0f} MiB; memory read bandwidth {bw[0]:.1f} GB/s "
              f"(plain sum), {bw[1]:.1f} GB/s (with prefetch)")
    head = f"{'test':>8} | {'numba_apr tok/s':>17}"
    if a.llama_bench:
        head += f" | {'llama.cpp tok/s':>17} | ratio"
    print(head)
    for k, n in (("pp", a.n_prompt), ("tg", a.n_gen)):
        if not ours[k]:
            continue
        line = f"{k}{n:>6} | {fmt(ours[k])}"
        if theirs[k]:
            line += f" | {fmt(theirs[k])} | {statistics.mean(ours[k]) / statistics.mean(theirs[k]):.2f}x"
        if k == "tg":
            line += f"   ({statistics.mean(ours[k]) * gb:.1f} GB/s of weights, {statistics.mean(ours[k]) * gb / bw[1]:.0%} {bw_name})"
        print(line)


if __name__ == "__main__":
    main()
