"""`numba-apr serve`: an OpenAI- and Ollama-compatible HTTP server that batches concurrent
requests (scheduler.py: continuous batching over the model's KV slots; app.py: the routes).
Needs the `server` extra (FastAPI + uvicorn)."""
