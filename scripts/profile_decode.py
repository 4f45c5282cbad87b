#!/usr/bin/env python3
"""Where a GPU decode step's time goes: each part of the step knocked out in turn.

    python scripts/profile_decode.py MODEL [--pos 64] [--steps 8] [--reps 30]

The decode step is captured as generation replays it (a CUDA graph of --steps chained greedy
steps, programmatic dependent launch and all) at position --pos of a random prompt, and timed
with CUDA events. Then it is captured again once per part (the embedding, Q/K/V, attention, wo,
gate/up, down, the output head, and any unfused helper kernels), with that part's launches left
out (kernels/cuda/launch.py's SKIP). A part's cost is what the step saves without it: its
kernels, and the gap each leaves between the kernels around it, which a kernel timed alone
would not show. The knocked-out steps compute wrong values (the kernels after a missing one read
stale inputs); only their time is used. Parts overlap, so their costs need not add up to the
step: "rest" is the step less their sum (the sampler, the position update, and the overlap).

Per part it prints the launches a step, the weights they read (MB a step), the cost (us a step,
and its share), and the weights over the cost (GB/s). The whole step is timed again at the end:
compare the two figures to see the run's drift. Only for `device="cuda"`, on a GPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def part_matrices(w) -> list[tuple[str, object]]:
    """(part, DeviceMatrix) for every matrix a decode step reads, a model's DeviceWeights."""
    out = []
    for L in w.layers:
        out += [("Q/K/V", m) for m, _ in L.qkv] + [("wo", L.wo)]
        out += [("gate/up", m) for m, _ in L.gate_up] + [("down", L.w_down)]
    return out + [("output head", w.output)]   # (tied: the embedding's matrix too)


def part_names(w) -> dict[int, str]:
    """id(weight array) -> the part that reads it."""
    return {id(m.w): part for part, m in part_matrices(w)}


def part_of(kernel, args, names: dict[int, str]) -> str:
    """The part of a decode step that a launch (kernel, args) belongs to."""
    fn = getattr(kernel, "py_func", None) or getattr(kernel, "fn", kernel)   # (simulator: .fn)
    module, name = fn.__module__.rsplit(".", 1)[-1], fn.__name__
    if module == "attention":
        return "attention"
    if module == "ops":
        return "embedding" if "embed" in name else name.strip("_")
    for a in args:
        if id(a) in names:
            return names[id(a)]
    return f"{module}.{name}"


def weight_bytes(w) -> dict[str, int]:
    """Bytes of weights each part reads a decode step."""
    out: dict[str, int] = {}
    for part, m in part_matrices(w):
        out[part] = out.get(part, 0) + m.nbytes
    return out


class Profiler:
    """Decode steps of one model (loaded with device="cuda") captured and timed with parts left out."""

    def __init__(self, model, pos: int, steps: int):
        from numba_apr.kernels.cuda.attention import SHORT_CTX
        from numba_apr.kernels.cuda.sampling import DeviceSampler
        from numba_apr.sampling import SamplingParams

        self.runner = runner = model.runner
        self.pos, self.steps = pos, steps
        self.short = pos + steps <= SHORT_CTX
        self.names = part_names(runner.w)
        self.sampler = DeviceSampler(runner.c.n_vocab, SamplingParams(temperature=0.0), runner.s.n_ctx)
        self.token = np.zeros(1, np.int32)
        ids = np.random.default_rng(0).integers(0, runner.c.n_vocab, pos).astype(np.int32)
        if pos:      # the KV cache filled up to pos, as after a prompt
            model._eval(ids, 0, host=False)
        self.sampler.set_history(ids, runner.stream)

    def launches(self) -> dict[str, int]:
        """Launches a decode step, per part (one step run eagerly, every launch counted)."""
        counts: dict[str, int] = {}

        def count(kernel, args):
            part = part_of(kernel, args, self.names)
            counts[part] = counts.get(part, 0) + 1
            return False
        self.runner._set_inputs(self.token, self.pos)
        self._run(count, self.runner.stream, 1)
        return counts

    def capture(self, skip_part: str | None):
        """The graph of `steps` decode steps with skip_part's launches left out: run eagerly
        first (compiling what it needs), then recorded, as CudaRunner._replay does."""
        def skip(kernel, args):
            return part_of(kernel, args, self.names) == skip_part
        pred = None if skip_part is None else skip
        self.runner._set_inputs(self.token, self.pos)
        self._run(pred, self.runner.stream, self.steps)
        self.runner.stream.synchronize()
        gb = self.runner.core_stream.create_graph_builder()
        gb.begin_building()
        self._run(pred, gb, self.steps)
        return gb.end_building().complete()

    def _run(self, pred, stream, n):
        from numba_apr.kernels.cuda import launch
        launch.SKIP = pred
        try:
            self.runner._steps(self.sampler, stream, self.short, n)
        finally:
            launch.SKIP = None

    def time(self, graph, reps: int) -> float:
        """Median us a step of graph, replayed reps times from (token, pos)."""
        from numba import cuda
        r = self.runner
        ev0, ev1 = cuda.event(), cuda.event()
        us = []
        for i in range(reps + 1):     # (the first, untimed, warms)
            # Every replay from (token, pos): a graph replayed from where the last one left the
            # position writes KV-cache rows past pos + steps, past the cache's end (n_ctx is
            # pos + steps + 1): an illegal address on a 7B, silent corruption elsewhere.
            r._set_inputs(self.token, self.pos)
            ev0.record(r.stream)
            graph.launch(r.core_stream)
            ev1.record(r.stream)
            ev1.synchronize()
            if i:
                us.append(cuda.event_elapsed_time(ev0, ev1) * 1e3 / self.steps)
        return statistics.median(us)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--pos", type=int, default=64, help="position of the first timed step (default 64)")
    ap.add_argument("--steps", type=int, default=8, help="chained decode steps a graph (default 8)")
    ap.add_argument("--reps", type=int, default=30, help="graph replays a measurement (default 30)")
    a = ap.parse_args()

    import numba_apr
    from numba_apr.errors import NumbaAprError
    from numba_apr.model.cuda import DECODE_STEPS
    try:
        if not 1 <= a.steps <= DECODE_STEPS:
            raise NumbaAprError(f"--steps must be 1..{DECODE_STEPS}, got {a.steps}")
        if a.pos < 0 or a.reps < 1:
            raise NumbaAprError("--pos must be >= 0 and --reps >= 1")
        model = numba_apr.load(a.model, n_ctx=a.pos + a.steps + 1, device="cuda")
        if a.pos + a.steps + 1 > model.n_ctx:
            raise NumbaAprError(f"--pos {a.pos} + --steps {a.steps} is past the model's context ({model.n_ctx})")
        p = Profiler(model, a.pos, a.steps)
        counts = p.launches()
        base = p.time(p.capture(None), a.reps)
        cost = {part: base - p.time(p.capture(part), a.reps) for part in counts}
        again = p.time(p.capture(None), a.reps)
    except NumbaAprError as e:
        sys.exit(f"error: {e}")

    wb = weight_bytes(p.runner.w)
    print(f"model {os.path.basename(a.model)}, steps at positions {a.pos}..{a.pos + a.steps - 1}, "
          f"{a.steps} a graph: {base:,.1f} us a step ({1e6 / base:,.1f} tok/s); again at the end: {again:,.1f} us")
    print(f"{'part':<16} {'launches':>8} {'weights MB':>10} {'us a step':>10} {'share':>6} {'GB/s':>7}")
    for part, n in counts.items():
        mb, us = wb.get(part, 0) / 1e6, cost[part]
        gbs = f"{mb / us * 1e3:7.0f}" if mb and us > 0 else f"{'':>7}"
        print(f"{part:<16} {n:>8} {mb:>10.1f} {us:>10.1f} {us / base:>6.0%} {gbs}")
    rest = base - sum(cost.values())
    print(f"{'rest':<16} {'':>8} {'':>10} {rest:>10.1f} {rest / base:>6.0%}")


if __name__ == "__main__":
    main()
