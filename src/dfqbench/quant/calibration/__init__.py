"""Setting ranges and weights of a wrapped model: calibration on batches or from BatchNorm statistics, and block
reconstruction (AdaRound / BRECQ / QDrop)."""
