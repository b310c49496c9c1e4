"""Optuna studies over a method's hyperparameters, on the validation split only.

`space` declares the search ranges per method, `objective` turns one trial into a `train_cell`
call with the test split sealed, `run` creates/resumes a study and runs its workers, `export`
writes the best parameters for the grid, `plots` draws Optuna's figures, `cli` wires
`flexbench study run|best|plots`. The user guide is docs/studies.md.
"""
