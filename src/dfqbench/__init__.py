"""dfqbench: the reference benchmark harness for data-free (zero-shot) quantization."""

__version__ = "0.1.0"
