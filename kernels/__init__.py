"""Fused GPU kernels for XGeM (Triton), used by the model through xgem_dist.model.attention and
xgem_dist.model.norm."""
