"""Prefect's start-up settings for a command run on a machine without a Prefect server.

Without `PREFECT_API_URL`, Prefect starts a temporary local server (11-26 s cold on a small CPU, database
migrations); the defaults below give it time and keep it quiet offline. Applied before Prefect is imported;
any value the user set wins.
"""

from __future__ import annotations

import os

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def apply_prefect_defaults() -> None:
    for k, v in PREFECT_DEFAULTS.items():
        os.environ.setdefault(k, v)
