"""Names the `study` CLI offers, kept free of heavy imports so `flexbench --help` stays fast."""

OBJECTIVES = {
    "mean": "mean validation top-1 over the sub-models",
    "smallest": "validation top-1 of the smallest sub-model",
    "auc": "area under validation top-1 vs MFLOPs, divided by the MFLOPs range",
}
SAMPLERS = ("tpe", "random", "cmaes")
PRUNERS = ("median", "hyperband", "none")
HEARTBEAT_S = 60  # seconds between worker heartbeats of RDB storages
