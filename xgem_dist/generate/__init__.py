"""Generation from a trained XGeM: `xgem-dist sample` (load, studies, sample) and `xgem-dist evaluate`
(evaluate, metrics, html)."""
