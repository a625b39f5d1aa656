"""Generation from a trained XGeM: `xgem-dist sample` (load, sample) and `xgem-dist evaluate` (evaluate, metrics, html)."""
