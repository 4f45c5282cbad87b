"""`numba_apr.serve`: the server as a Ray Serve application (the `ray` extra). The code lives in
numba_apr/server/ray_serve.py; this is the name to import and to give `serve run`:

    serve run numba_apr.serve:build_app model=MODEL.gguf parallel=4 replicas=2
"""
from .server.ray_serve import (
    APP_NAME,
    DEPLOYMENT_NAME,
    REPLICA_HEADER,
    TRIES_HEADER,
    Replica,
    ReplicaFailover,
    build_app,
    main,
    proxy_middlewares,
)

__all__ = ["APP_NAME", "DEPLOYMENT_NAME", "REPLICA_HEADER", "TRIES_HEADER", "Replica", "ReplicaFailover",
           "build_app", "main", "proxy_middlewares"]
