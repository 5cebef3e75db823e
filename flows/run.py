"""Run the compare flow from a command line: Prefect's start-up settings for a machine without a server.

Without `PREFECT_API_URL`, Prefect starts a temporary local server (11-26 s cold on a small CPU, database
migrations); the defaults below give it time and keep it quiet offline. Set before Prefect is imported;
any value the user set wins.
"""

from __future__ import annotations

import os

from qtuning.config import CompareConfig

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def run_comparison(config: CompareConfig):
    """Run `flows.compare.compare(config)` and return its ComparisonResult (raises if the flow fails)."""
    for k, v in PREFECT_DEFAULTS.items():
        os.environ.setdefault(k, v)
    from flows.compare import compare

    return compare(config)  # Prefect turns SIGTERM into an exception: runs end KILLED, a trainer is stopped
