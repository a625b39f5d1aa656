"""Fused GPU kernels for XGeM (Triton), used by the model through xgem_dist.model.attention."""
