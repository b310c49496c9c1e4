"""Paper-style figures and tables from the MLflow record of a flexbench experiment.

Data flows one way: MLflow runs -> `load` (one tidy pandas table) -> `stats` (means, CIs, paired
tests) -> `tables` / `figures` -> `page` (index.html, report.md) -> logged back to MLflow as the
artifacts of a `report` run. `cli` wires it to `flexbench report`.
"""
