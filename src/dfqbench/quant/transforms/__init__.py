"""Graph work on a traced model: classify nodes, fold BatchNorm, equalize, correct bias, propagate BN statistics,
and place the quantizers of a convention (wrap.quantize_model)."""
