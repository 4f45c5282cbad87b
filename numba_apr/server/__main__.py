"""`python -m numba_apr.server` / `numba-apr serve`: llama-server's flags, one-line errors."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import NumbaAprError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="numba-apr serve", description="Serve a GGUF model over OpenAI's and Ollama's HTTP APIs.")
    p.add_argument("-m", "--model", default=None, help="GGUF file or packaged model name (default: gemma-3-270m)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096,
                   help="context size, shared by the slots as llama-server does (default 4096)")
    p.add_argument("-np", "--parallel", type=int, default=4, help="sequences decoded together (slots; default 4)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1, /api and /metrics")
    p.add_argument("--metrics", action="store_true", help="serve Prometheus metrics at /metrics")
    p.add_argument("-a", "--alias", default=None, help="model name the API shows (default: the file's stem)")
    p.add_argument("--ray", action="store_true", help="run as a Ray Serve application: replicas on a Ray cluster "
                   "(the 'ray' extra; `numba-apr serve --ray --help` lists its flags)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--ray" in argv:  # the same app, replicated by Ray Serve (ray_serve.py)
        try:
            from .ray_serve import main as ray_main
        except ImportError as e:
            print(f"error: --ray needs the 'ray' extra (pip install 'numba_apr[ray]'): {e}", file=sys.stderr)
            return 1
        return ray_main(argv)
    a = build_parser().parse_args(argv)
    try:
        import uvicorn

        from .. import packaged
        from ..api import load
        from .app import Server, create_app
        from .scheduler import Scheduler
    except ImportError as e:
        print(f"error: the server needs the 'server' extra (pip install 'numba_apr[server]'): {e}", file=sys.stderr)
        return 1
    try:
        if not 1 <= a.parallel <= 64:
            raise NumbaAprError(f"--parallel must be from 1 to 64, got {a.parallel}")
        if not 1 <= a.port <= 65535:
            raise NumbaAprError(f"--port must be from 1 to 65535, got {a.port}")
        if a.ctx_size < a.parallel:
            raise NumbaAprError(f"--ctx-size {a.ctx_size} leaves no context for {a.parallel} slots")
        path = packaged.resolve(a.model)
        model = load(path, device=a.device, n_ctx=a.ctx_size // a.parallel, threads=a.threads, n_seq=a.parallel)
        scheduler = Scheduler(model)
    except NumbaAprError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    server = Server(model, scheduler, a.alias or Path(path).stem, a.api_key, a.metrics)
    print(f"numba_apr: serving {server.model_id} on http://{a.host}:{a.port} ({a.parallel} slots of "
          f"{model.n_ctx} tokens)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(create_app(server), host=a.host, port=a.port, log_level="warning")
    except (OSError, SystemExit) as e:
        print(f"error: cannot serve on {a.host}:{a.port}: {e}", file=sys.stderr)
        return 1
    finally:
        scheduler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
