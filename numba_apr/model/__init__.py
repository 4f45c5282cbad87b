"""The model: the GGUF reader, tensor formats, the repacked CPU layout, architectures
(arch/), and the forward pass per back-end (cpu.py, cuda.py), each behind a runner."""
