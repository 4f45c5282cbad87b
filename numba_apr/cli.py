"""Command line: `python scripts/generate.py "Once upon a time"` (or `numba-apr ...`).

Flags follow llama.cpp's habits. Output streams to stdout; a progress bar (only when loading
takes over a second) and the closing stats line go to stderr. Every user error ends as one
line `error: ...` and exit status 1 (2 for bad flags), never a traceback.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time

from .errors import NumbaAprError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message}\n")


def _positive(kind, minimum):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not v >= minimum:  # also rejects nan
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="generate.py", description="Generate text with a GGUF model on numba_apr.")
    p.add_argument("prompt_pos", nargs="?", metavar="PROMPT", help="prompt text (or use -p)")
    p.add_argument("-m", "--model", default=None,
                   help="GGUF file, or a packaged model name (default: gemma-3-270m)")
    p.add_argument("-p", "--prompt", default=None, help="prompt text")
    p.add_argument("-n", "--n-predict", type=_positive(int, -1), default=128,
                   help="tokens to generate (-1: until the context is full; default 128)")
    p.add_argument("--temp", type=_positive(float, 0.0), default=0.8, help="temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=40, help="top-k (<= 0: off)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p (1: off)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p (0: off)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty (1: off)")
    p.add_argument("--seed", type=int, default=-1, help="RNG seed (-1: random)")
    p.add_argument("-r", "--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("-t", "--threads", type=_positive(int, 1), default=None, help="CPU threads")
    p.add_argument("-c", "--ctx-size", type=_positive(int, 1), default=4096, help="context size")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (an NVIDIA GPU through numba.cuda)")
    p.add_argument("--chat", action="store_true", help="interactive chat with the chat template")
    return p


class _Progress:
    """A stderr progress bar drawn by a thread, shown only once loading has taken > 1 s."""

    def __init__(self):
        self.frac, self.what, self.t0 = 0.0, "", time.perf_counter()
        self.done = threading.Event()
        self.shown = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def __call__(self, frac, what):
        self.frac, self.what = frac, what

    def _draw(self):
        n = int(self.frac * 30)
        sys.stderr.write(f"\rloading [{'#' * n}{'.' * (30 - n)}] {self.frac:4.0%} {self.what:<20}")
        sys.stderr.flush()
        self.shown = True

    def _run(self):
        if not sys.stderr.isatty():  # a log file gets no carriage-return animation
            return
        while not self.done.wait(0.2):
            if time.perf_counter() - self.t0 > 1.0:
                self._draw()

    def close(self):
        self.done.set()
        self.thread.join()
        if self.shown:
            self._draw()
            sys.stderr.write("\n")


def _stats_line(load_s, stats) -> str:
    def rate(n, s):
        return f"{n / s:.1f} tok/s" if s > 0 and n else "-"
    return (f"load {load_s:.2f} s | prompt {stats.prompt_tokens} tokens, "
            f"{rate(stats.prompt_tokens, stats.prompt_seconds)} | generated {stats.generated_tokens} "
            f"tokens, {rate(stats.generated_tokens, stats.generate_seconds)}")


def _stream(pieces) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()


def run(args) -> int:
    from .api import load
    from .generate import GenerationStats
    from .sampling import SamplingParams

    prompt = args.prompt if args.prompt is not None else args.prompt_pos
    if args.prompt is not None and args.prompt_pos is not None:
        raise NumbaAprError("give the prompt either as an argument or with -p, not both")
    if prompt is None and not args.chat:
        prompt = "Once upon a time"
    # Check the sampling flags before the (slow) load; load() checks the device first thing.
    SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                   repeat_penalty=args.repeat_penalty).validate()
    progress = _Progress()
    try:
        model = load(args.model, device=args.device, n_ctx=args.ctx_size, threads=args.threads,
                     progress=progress)
    finally:
        progress.close()
    n = model.n_ctx if args.n_predict == -1 else args.n_predict
    sampling = dict(max_tokens=n, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                    min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                    seed=None if args.seed < 0 else args.seed, stop=args.stop)
    if not args.chat:
        stats = GenerationStats()
        sys.stdout.write(prompt)
        _stream(model.generate(prompt, stats=stats, **sampling))
        sys.stdout.write("\n")
        print(_stats_line(model.load_seconds, stats), file=sys.stderr)
        return 0

    messages = [] if prompt is None else [{"role": "system", "content": prompt}]
    print("chat mode: type a message, an empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        stats, reply = GenerationStats(), []
        for piece in model.chat(messages, stats=stats, **sampling):
            reply.append(piece)
            _stream([piece])
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
        print(_stats_line(model.load_seconds, stats), file=sys.stderr)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # `numba-apr serve ...`: the HTTP server (numba_apr/server)
        from .server.__main__ import main as serve
        return serve(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except NumbaAprError as e:
        print(f"error: {e}", file=sys.stderr)
    except (OSError, MemoryError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    return 1
