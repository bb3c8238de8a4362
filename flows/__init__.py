"""Prefect flows and the command line: orchestration of storage and miner, nothing else."""

import os

# Prefect reads its settings at import: keep analytics off unless the user says otherwise.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
