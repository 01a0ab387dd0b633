"""Fake-quant kernels behind one protocol: ATen's built-ins (`torch`) and Triton's (`triton`, imported lazily)."""
