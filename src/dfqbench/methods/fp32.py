"""The full-precision reference row: the teacher, unquantized."""

from .base import Method


class FP32(Method):
    quantizes = False
    needs_batchnorm = False

    def quantize(self, model, ctx):
        return model
