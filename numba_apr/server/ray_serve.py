"""The server as a Ray Serve application (`numba_apr.serve`; the `ray` extra).

Each replica of the deployment is one loaded model with its batching scheduler, serving the same
FastAPI app as `numba-apr serve` (app.create_app: same routes, same OpenAI / Ollama shapes, same
errors). Serve spreads the replicas over a Ray cluster, puts an HTTP proxy on every node, routes
each request to a replica with a free slot (a replica's `max_ongoing_requests` is its slot
count, so a busy replica is not handed more than it batches; the rest wait in the proxy's queue
for whichever replica frees a slot first), restarts replicas that die, and scales their number
between bounds on the requests in flight.

    numba-apr serve --ray -m MODEL.gguf -np 4 -t 2 --replicas 2           # on the running cluster
    numba-apr serve --ray -m MODEL.gguf --min-replicas 1 --max-replicas 8
    serve run docs/serve_config.yaml                                       # Serve's own CLI

Here live: `Replica` (the deployment's class), `build_app` (the application builder that
`serve run` / `serve deploy` import and `--ray` calls), `proxy_middlewares` (what Serve's proxies
run around every request when the cluster was started with it: a request whose replica died
before it answered is sent again, one cut mid-stream ends with an error event) and `main`
(`numba-apr serve --ray`). docs/server.md, "Scale out with Ray Serve", has the rest.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ray import serve

from ..errors import NumbaAprError

APP_NAME = "numba_apr"
DEPLOYMENT_NAME = "numba_apr"
REPLICA_HEADER = "x-numba-apr-replica"  # names the replica (its Ray actor) on every response
TRIES_HEADER = "x-numba-apr-tries"      # on a response that took more than one try (ReplicaFailover)
# The app's routes (app.py; tests/test_ray_serve.py checks the two agree): the proxies'
# middleware acts on these paths only, leaving other applications of the cluster alone.
ROUTES = frozenset({"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
                    "/api/generate", "/api/chat", "/api/tags"})
PROXY_CALLBACK = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK_PATH = "numba_apr.serve:proxy_middlewares"


# -- the deployment ----------------------------------------------------------------------------
class _NameReplica:
    """ASGI middleware: every response says which replica made it (tests count the spread by it;
    an operator finds the replica's log by it)."""

    def __init__(self, app, name: str):
        self.app, self.name = app, name.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.name)]}
            await send(message)
        await self.app(scope, receive, named)


@serve.ingress()  # the app is built per replica, around the replica's own model (below)
class Replica:
    """One replica: a model loaded with `parallel` KV slots, its scheduler thread, and the
    server's FastAPI app over them. Its Ray actor holds `num_cpus` CPUs (or one GPU); Numba's
    thread pool is sized by NUMBA_NUM_THREADS in the actor's environment (build_app sets it)."""

    def __init__(self, model: str | None, ctx_size: int, parallel: int, threads: int | None, device: str,
                 api_key: str | None, metrics: bool, alias: str | None):
        from .. import packaged
        from ..api import load
        from .app import Server
        from .scheduler import Scheduler

        path = packaged.resolve(model)
        self.model = load(path, device=device, n_ctx=ctx_size // parallel, threads=threads, n_seq=parallel)
        self.scheduler = Scheduler(self.model)
        self._warm_up()
        self.server = Server(self.model, self.scheduler, alias or Path(path).stem, api_key, metrics)
        # The replica's Ray actor name (namespace "serve"): what ray.get_actor / ray.kill take.
        self.name = serve.get_replica_context().replica_id.to_full_id_str()

    def _warm_up(self):
        """One short request through the scheduler before the replica reports ready: the first
        batch loads (or, with a cold Numba cache, compiles) the batch kernels, which would
        otherwise be the first client's wait; Serve routes nothing here until this returns. (It is
        counted in /metrics: one request, two tokens.)"""
        from ..sampling import SamplingParams
        from .scheduler import Request
        ended = threading.Event()
        ids = self.model.tokenize("Hello", add_bos=True, special=True)
        self.scheduler.submit(Request(ids, SamplingParams(temperature=0.0), 2,
                                      lambda ev: (ev.get("done") or "error" in ev) and ended.set(), ignore_eos=True))
        if not ended.wait(900):
            raise RuntimeError("the warm-up request did not finish in 900 s")

    def __serve_build_asgi_app__(self):
        from .app import create_app
        app = create_app(self.server)
        app.add_middleware(_NameReplica, name=self.name)
        return app

    def check_health(self):
        # Serve calls this every few seconds; a replica whose scheduler thread died can only
        # time its requests out, so it is reported unhealthy and replaced.
        if not self.scheduler.thread.is_alive():
            raise RuntimeError("the scheduler thread has stopped")

    def __del__(self):
        # A graceful stop (scale-down, `serve delete`): running requests end with their `done`.
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.close()


# -- the application builder -------------------------------------------------------------------
DEFAULTS = dict(model=None, ctx_size=4096, parallel=4, threads=1, device="cpu", api_key=None, metrics=False,
                alias=None, replicas=1, min_replicas=None, max_replicas=None, target_ongoing_requests=None,
                max_queued_requests=None, num_cpus=None)


def _model(model):
    """A packaged model's name as it is (each node fetches it), else the file checked here (that
    it opens as a GGUF of a known architecture) and named by its absolute path, which must be
    the same on every node (a shared or copied folder)."""
    from .. import packaged
    if model is None or (str(model) in packaged.PACKAGED and not Path(model).exists()):
        return model
    from ..model.arch import build_config
    from ..model.gguf_file import GGUFFile
    path = packaged.resolve(Path(model).expanduser()).resolve()
    build_config(GGUFFile(path))
    return str(path)


def _number(a, name, lo, hi, integer=True):
    """a[name] as a number from lo to hi (`serve run ... parallel=4` passes strings)."""
    v = a[name]
    if isinstance(v, str):
        try:
            v = int(v) if integer else float(v)
        except ValueError:
            pass
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise NumbaAprError(f"{name.replace('_', '-')} must be {kind} from {lo} to {hi}, got {a[name]!r}")
    return v


def options(args: dict | None = None) -> dict:
    """The builder's arguments (a config file's `args:`, `serve run`'s key=value pairs, or the
    CLI's flags), checked and completed with the defaults; a bad one raises NumbaAprError."""
    args = {k: v for k, v in (args or {}).items() if v is not None}
    unknown = sorted(set(args) - set(DEFAULTS))
    if unknown:
        raise NumbaAprError(f"unknown argument(s) {', '.join(unknown)} (known: {', '.join(DEFAULTS)})")
    auto = "min_replicas" in args or "max_replicas" in args
    if auto and "replicas" in args:
        raise NumbaAprError("give either replicas or min-replicas / max-replicas (autoscaling), not both")
    if "min_replicas" in args and "max_replicas" not in args:
        raise NumbaAprError("min-replicas needs max-replicas (the autoscaling bounds)")
    a = {**DEFAULTS, **args}
    a["model"] = _model(a["model"])
    if isinstance(a["metrics"], str):
        a["metrics"] = a["metrics"].lower() in ("1", "true", "yes", "on")
    if a["device"] not in ("cpu", "cuda"):
        raise NumbaAprError(f"device must be cpu or cuda, got {a['device']!r}")
    a["parallel"] = _number(a, "parallel", 1, 64)
    a["ctx_size"] = _number(a, "ctx_size", a["parallel"], 1 << 24)
    a["threads"] = _number(a, "threads", 1, 1024)
    a["num_cpus"] = _number({**a, "num_cpus": a["threads"] if a["num_cpus"] is None else a["num_cpus"]},
                            "num_cpus", 0, 1024, integer=False)
    a["replicas"] = _number(a, "replicas", 1, 4096)
    if auto:
        a["min_replicas"] = _number({**a, "min_replicas": 1} if a["min_replicas"] is None else a,
                                    "min_replicas", 0, 4096)
        a["max_replicas"] = _number(a, "max_replicas", max(a["min_replicas"], 1), 4096)
    # Scale up when a replica's slots are all busy, unless told otherwise.
    a["target_ongoing_requests"] = _number({**a, "target_ongoing_requests": a["target_ongoing_requests"] or
                                            a["parallel"]}, "target_ongoing_requests", 0.01, a["parallel"],
                                           integer=False)
    most = a["max_replicas"] if auto else a["replicas"]
    if a["max_queued_requests"] is None:
        a["max_queued_requests"] = 4 * a["parallel"] * most  # the single server's waiting line, per replica
    a["max_queued_requests"] = _number(a, "max_queued_requests", -1, 1 << 30)
    return a


def deployment_options(a: dict) -> dict:
    """serve.deployment's options for checked arguments `a`."""
    env = {"NUMBA_NUM_THREADS": str(a["threads"]), "OMP_NUM_THREADS": str(a["threads"])}
    actor = {"num_cpus": a["num_cpus"], "runtime_env": {"env_vars": env}}
    if a["device"] == "cuda":
        actor["num_gpus"] = 1
    opts = dict(name=DEPLOYMENT_NAME, ray_actor_options=actor, max_ongoing_requests=a["parallel"],
                max_queued_requests=a["max_queued_requests"],
                # Loading compiles nothing once Numba's cache is warm, but a cold cache compiles
                # the batch kernels: give a starting replica time before it is declared failed.
                health_check_period_s=5, health_check_timeout_s=60, graceful_shutdown_timeout_s=30,
                max_constructor_retry_count=3)  # a model that fails to load fails the same way again
    if a["min_replicas"] is not None:
        opts["autoscaling_config"] = {"min_replicas": a["min_replicas"], "max_replicas": a["max_replicas"],
                                      "target_ongoing_requests": a["target_ongoing_requests"]}
    else:
        opts["num_replicas"] = a["replicas"]
    return opts


def build_app(args: dict | None = None) -> serve.Application:
    """The application: `serve run numba_apr.serve:build_app model=PATH parallel=4`, a config
    file's `import_path: numba_apr.serve:build_app` with `args:`, or `--ray`."""
    return _build(options(args))


def _build(a: dict) -> serve.Application:
    """build_app for arguments options() has checked."""
    dep = serve.deployment(**deployment_options(a))(Replica)
    return dep.bind(a["model"], a["ctx_size"], a["parallel"], a["threads"], a["device"], a["api_key"],
                    a["metrics"], a["alias"])


# -- the proxies' middleware -------------------------------------------------------------------
class ReplicaFailover:
    """ASGI middleware around a Serve HTTP proxy (see `proxy_middlewares`).

    Serve's proxy, when the replica holding a request dies, answers a plain-text 500 if nothing
    had been sent yet, and otherwise drops the connection mid-body. Here instead:
     - a request whose response has sent no body bytes yet (a whole-body request still being
       generated; a stream still reading its prompt: its headers are held back until its first
       token) is sent again, and Serve's router picks a live replica (`tries` in all; the
       answer says TRIES_HEADER: N when it took more than one);
     - a stream cut after its first bytes ends with an error event in its own format (SSE:
       `data: {"error": {...}}`, as the server's own errors; NDJSON: `{"error": ...}`) and a
       complete HTTP response, so no client mistakes the cut for the end;
     - the proxy's own errors (queue full 503, timeout 408, no replica) become OpenAI-shaped
       JSON like the app's. A response from the app always carries REPLICA_HEADER, so one
       without it came from the proxy.
    Request bodies are read whole first (they are small JSON) so that they can be sent again.
    """

    def __init__(self, app, tries: int = 3, wait: float = 0.25):
        self.app, self.tries, self.wait = app, tries, wait

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in ROUTES:  # Serve's own, other apps'
            return await self.app(scope, receive, send)
        parts, more = [], True
        while more:
            m = await receive()
            if m["type"] == "http.disconnect":
                return
            parts.append(m.get("body", b""))
            more = m.get("more_body", False)
        body = b"".join(parts)
        gone = asyncio.Event()
        for attempt in range(self.tries):
            state = await self._attempt(scope, receive, send, body, gone, attempt + 1)
            if state["done"] or gone.is_set():
                return
            if state["sent"]:  # cut after its first bytes: say so, in the stream's own format
                return await _end_with_error(send, state["ctype"], "the replica serving this request stopped "
                                             "before finishing it; the text above is incomplete")
            await asyncio.sleep(self.wait * (attempt + 1))  # nothing sent: another replica gets it
        await _send_json_error(send, 503, f"no replica finished this request ({self.tries} tries): the replicas "
                               "that took it stopped; retry later", "server_error", [(b"retry-after", b"1")])

    async def _attempt(self, scope, receive, send, body, gone, tries):
        state = {"start": None, "sent": False, "done": False, "ctype": b"", "proxy_error": None}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            m = await receive()
            if m["type"] == "http.disconnect":
                gone.set()
            return m

        async def guarded(m):
            kind = m["type"]
            if kind == "http.response.start":
                headers = dict(m.get("headers", []))
                state["start"], state["ctype"] = m, headers.get(b"content-type", b"")
                if m["status"] >= 400 and REPLICA_HEADER.encode() not in headers:
                    state["proxy_error"] = []  # the proxy's own: rewritten once its body is in
                return
            if kind != "http.response.body":
                return await send(m)
            if state["proxy_error"] is not None:
                state["proxy_error"].append(m.get("body", b""))
                if not m.get("more_body", False):
                    start = state["start"]
                    text = b"".join(state["proxy_error"]).decode("utf-8", "replace").strip() or "proxy error"
                    extra = [(k, v) for k, v in start.get("headers", []) if k.lower() == b"retry-after"]
                    state["done"] = True
                    await _send_json_error(send, start["status"], text, _PROXY_KINDS.get(start["status"],
                                                                                          "server_error"), extra)
                return
            if not state["sent"]:
                if not m.get("body") and m.get("more_body", False):
                    return  # nothing to show yet: the headers wait with it
                state["sent"] = True
                start = state["start"]
                if tries > 1:
                    start = {**start, "headers": [*start.get("headers", []), (TRIES_HEADER.encode(), b"%d" % tries)]}
                await send(start)
            if not m.get("more_body", False):
                state["done"] = True
            await send(m)

        try:
            await self.app(scope, replay, guarded)
        except Exception:  # the proxy's failure is handled like a dead replica's: by what was sent
            pass
        return state


_PROXY_KINDS = {503: "server_busy", 408: "timeout_error", 429: "server_busy", 404: "not_found_error"}


async def _send_json_error(send, status, message, kind, extra_headers=()):
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *extra_headers]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _end_with_error(send, ctype, message):
    if ctype.startswith(b"text/event-stream"):
        tail = f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
    elif ctype.startswith(b"application/x-ndjson"):
        tail = json.dumps({"error": message}) + "\n"
    else:
        tail = ""
    await send({"type": "http.response.body", "body": tail.encode(), "more_body": False})


def proxy_middlewares():
    """What `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=numba_apr.serve:proxy_middlewares` makes
    Serve's proxies run (set where the proxies start: `ray start`'s environment, or the job's
    runtime_env when `numba-apr serve --ray` is what starts Serve)."""
    from starlette.middleware import Middleware
    return [Middleware(ReplicaFailover)]


# -- `numba-apr serve --ray` -------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .__main__ import build_parser as server_parser
    p = server_parser()
    p.prog = "numba-apr serve --ray"
    p.description = ("Serve a GGUF model from replicas on a Ray cluster, behind Ray Serve's HTTP proxies "
                     "(the same routes as numba-apr serve).")
    p.set_defaults(port=8000, threads=1)  # Serve's usual port; one thread a replica unless -t says
    g = p.add_argument_group("Ray Serve")
    g.add_argument("--address", default=None,
                   help="Ray cluster to run on (default: $RAY_ADDRESS, else one started on this machine by "
                        "`ray start`, else a new one here that lives as long as this command)")
    g.add_argument("--replicas", type=int, default=None, help="replicas, each a loaded model (default 1)")
    g.add_argument("--min-replicas", type=int, default=None, help="autoscaling: fewest replicas (default 1)")
    g.add_argument("--max-replicas", type=int, default=None, help="autoscaling: most replicas")
    g.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="autoscaling: requests in flight a replica should hold (default: its slots, -np)")
    g.add_argument("--max-queued-requests", type=int, default=None,
                   help="requests a proxy holds waiting for a free slot before answering 503 "
                        "(default: 4 per slot of the most replicas; -1: no limit)")
    g.add_argument("--num-cpus", type=float, default=None,
                   help="CPUs each replica reserves on its node (default: -t)")
    g.add_argument("--app-name", default=APP_NAME, help=f"Serve application name (default {APP_NAME})")
    g.add_argument("--detach", action="store_true",
                   help="deploy and return; `serve delete NAME` (or `serve shutdown`) stops it")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if not 1 <= a.port <= 65535:
            raise NumbaAprError(f"--port must be from 1 to 65535, got {a.port}")
        args = options(dict(model=a.model, ctx_size=a.ctx_size, parallel=a.parallel, threads=a.threads,
                            device=a.device, api_key=a.api_key, metrics=a.metrics, alias=a.alias,
                            replicas=a.replicas, min_replicas=a.min_replicas, max_replicas=a.max_replicas,
                            target_ongoing_requests=a.target_ongoing_requests,
                            max_queued_requests=a.max_queued_requests, num_cpus=a.num_cpus))
    except NumbaAprError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        return _run(a, args)
    except KeyboardInterrupt:  # while joining the cluster
        print("", file=sys.stderr)
        return 130


def _run(a: argparse.Namespace, args: dict) -> int:
    import logging

    import ray
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    # The job's environment reaches the Serve controller and, through it, the proxies it starts:
    # they then run proxy_middlewares (a cluster whose Serve is already up keeps what it has).
    init = dict(runtime_env={"env_vars": {PROXY_CALLBACK: PROXY_CALLBACK_PATH}}, logging_level=logging.WARNING,
                log_to_driver=False)
    address = a.address or os.environ.get("RAY_ADDRESS")
    started_here = False
    try:
        _reachable(address)
        try:
            ray.init(address=address or "auto", **init)
        except ConnectionError:
            if address:
                raise
            ray.init(include_dashboard=False, **init)  # a cluster of this machine, for this command's lifetime
            started_here = True
    except Exception as e:  # a wrong address, a version mismatch: one line, no traceback
        # Ray sends its cluster token to an address given explicitly only if told to.
        hint = (" (if the cluster requires Ray's token: RAY_AUTH_MODE=token, with the token in RAY_AUTH_TOKEN "
                "or ~/.ray/auth_token)" if address and "RAY_AUTH_MODE" not in os.environ else "")
        print(f"error: cannot join the Ray cluster{' at ' + address if address else ''}: "
              f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}{hint}", file=sys.stderr)
        return 1
    problem, note = _capacity(args, [n for n in ray.nodes() if n.get("Alive")])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        _stop(None, started_here)
        return 1
    if note:
        print(f"numba_apr: {note}", file=sys.stderr, flush=True)
    # Ctrl-C / SIGTERM only set a flag, from now on: the deployment runs on a thread of its own,
    # so that a Ctrl-C while Serve waits (for replicas to load, or for resources) still stops it.
    stop, deployed, failed = threading.Event(), threading.Event(), []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def deploy():
        try:
            serve.start(http_options={"host": a.host, "port": a.port})
            serve.run(_build(args), name=a.app_name, route_prefix="/", blocking=False)
        except Exception as e:
            failed.append(e)
        finally:
            deployed.set()
    t0 = time.perf_counter()
    threading.Thread(target=deploy, name="numba_apr-deploy", daemon=True).start()
    while not deployed.wait(0.5) and not stop.is_set():
        pass
    if failed or not deployed.is_set():
        why = _first_line(failed[0]) if failed else "interrupted"
        print(f"error: the application did not start: {why}", file=sys.stderr)
        _stop(a.app_name, started_here)
        return 1
    scale = (f"{args['min_replicas']}-{args['max_replicas']} replicas" if args["min_replicas"] is not None
             else f"{args['replicas']} replica{'s' if args['replicas'] > 1 else ''}")
    print(f"numba_apr: serving {Path(args['model'] or 'gemma-3-270m').stem} on http://{a.host}:{a.port} "
          f"through Ray Serve ({scale} of {args['parallel']} slots, ready in {time.perf_counter() - t0:.1f} s)",
          file=sys.stderr, flush=True)
    if a.detach:
        print(f"numba_apr: running detached; stop it with `serve delete {a.app_name}`", file=sys.stderr)
        return 0
    while not stop.wait(1.0):
        pass
    _stop(a.app_name, started_here)
    print("numba_apr: stopped; every replica freed", file=sys.stderr)
    return 0


def _capacity(args: dict, nodes: list[dict]) -> tuple[str | None, str | None]:
    """(an error, a note) on whether the cluster's nodes hold the replicas asked for: Serve
    would otherwise wait, silently and for ever, for resources that are not there."""
    cpus, gpus = args["num_cpus"], 1 if args["device"] == "cuda" else 0
    per_node = [min(int(n["Resources"].get("CPU", 0) // cpus) if cpus else 1 << 20,
                    int(n["Resources"].get("GPU", 0) // gpus) if gpus else 1 << 20) for n in nodes]
    fits, want = sum(per_node), args["min_replicas"] if args["min_replicas"] is not None else args["replicas"]
    need = f"{cpus:g} CPU{'s' if cpus != 1 else ''}" + (" and a GPU" if gpus else "")
    if fits == 0 and want > 0:
        return (f"no node of the cluster has {need} for a replica (lower -t / --num-cpus, or add nodes)", None)
    if fits < want:
        return None, (f"the cluster's nodes hold {fits} of the {want} replicas of {need} asked for; Serve starts "
                      "the others when resources free up (Ctrl-C to give up)")
    return None, None


def _reachable(address: str | None) -> None:
    """Raise ConnectionError at once if nothing listens at a host:port address (Ray's own
    connection attempt retries for minutes before it gives up)."""
    import socket
    if not address or "://" in address or address == "auto" or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise ConnectionError(f"nothing answers there ({e})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # Serve's deploy errors carry the replica's traceback: its last line says what went wrong.
    return (lines[-1] if len(lines) > 1 else lines[0]) if lines else type(e).__name__


def _stop(app_name: str | None, started_here: bool) -> None:
    """Delete the application (its replicas stop, their requests ending first) and, where this
    command started the cluster, Serve and the cluster too."""
    import ray
    try:
        if app_name:
            serve.delete(app_name)
        if started_here:
            serve.shutdown()
    except Exception as e:  # e.g. interrupted before Serve was up: nothing of ours to delete
        print(f"numba_apr: while stopping: {_first_line(e)}", file=sys.stderr)
    finally:
        if started_here:
            ray.shutdown()
