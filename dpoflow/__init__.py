"""dpoflow: preference data and nightly DPO retraining, orchestrated by Prefect.

The import namespace maps onto the repository's top-level folders (pyproject's package-dir):
`dpoflow.tasks` is `tasks/` (the functional core), `dpoflow.flows` is `flows/` (the Prefect
shell) and `dpoflow.storage` is `storage/` (the versioned store). Only `dpoflow` is installed,
so a user's own `flows/` or `tasks/` folder cannot shadow ours.
"""

__version__ = "0.1.0"
