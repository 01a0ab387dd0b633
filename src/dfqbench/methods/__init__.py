"""Quantization methods: one module each, instantiated from conf/method/<name>.yaml (`_target_`)."""
