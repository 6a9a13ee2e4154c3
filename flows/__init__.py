"""Prefect flows: composition only. Each module runs as `python -m flows.<module> --config FILE`."""

import os

# Without a server, Prefect starts a temporary one per process; its first start migrates a fresh
# SQLite database, which can take longer than Prefect's 20 s default on a busy 2-core machine.
# Set here because Prefect reads its settings when it is first imported.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# Our modules log with `logging.getLogger(__name__)`; Prefect attaches its console and API handlers
# to these loggers too, so their messages reach the terminal and the flow run's logs in the UI.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tagdit,tasks,models,flows")
# That temporary server's telemetry service writes to the database while the first run migrates it
# and prints a "database is locked" traceback; no telemetry unless the user asks for it (as `make` does).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def outside_flow_runs() -> None:
    """For commands that run no flow (sample, serve): our loggers' records go to the terminal only,
    not to Prefect's API handler (which warns on every record it cannot send without a flow run)."""
    os.environ["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] = "ignore"
