"""Grid runner: expand a grid file into cells, skip/resume them from MLflow, run them in parallel.

Modules: `spec` (YAML -> validated GridSpec -> cells), `state` (what MLflow and the checkpoints
say about each cell), `worker` (the cell function both executors run), `local` (worker
processes on this machine), `ray_exec` (Ray tasks on a cluster), `progress` (live view),
`runner` (plan, run, summary) and `cli` (`flexbench grid ...`).

This package's __init__ stays import-free: worker processes import it before setting their
thread counts.
"""
