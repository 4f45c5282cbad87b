#!/usr/bin/env python3
"""Generate text with numba_apr: `python scripts/generate.py "Once upon a time"`.

Runs the packaged default model (gemma-3-270m) unless -m names a GGUF file or another
packaged model. `--help` lists the flags (llama.cpp's names).
"""
import sys

from numba_apr.cli import main

if __name__ == "__main__":
    sys.exit(main())
