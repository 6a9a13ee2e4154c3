"""Noticing that this process's flow run is being cancelled, when Prefect's worker no longer does.

A process worker cancels a flow run by stopping its process, but a worker that lost the server for
a while (a restart) stops watching its flow runs for that ("Cancellation observer failed"). So the
thread that renews a stage's folder lease (`tagdit.orchestrate.locks`) also polls the flow run's
state through a `CancelWatch`: once it reads Cancelling (or Cancelled) it asks training to stop
(`tagdit.train.stop`), which writes a checkpoint at the next step and ends the flow run Cancelled.
A poll that cannot reach the server is logged once per outage and tried again at the next one.
"""

from __future__ import annotations

import logging
from typing import Any

from tagdit.train.stop import request_stop

log = logging.getLogger(__name__)

CANCEL_STATES = ("CANCELLING", "CANCELLED")  # Prefect state types that end the run


class CancelWatch:
    """Polls one flow run's state; asks training to stop once the run is being cancelled."""

    def __init__(self, flow_run_id: str, purpose: str):
        self.flow_run_id, self.purpose = flow_run_id, purpose
        self.asked = False  # a stop was requested
        self.unreachable = False  # the last poll failed (logged once until one succeeds)

    def poll(self, client: Any) -> bool:
        """Read the flow run's state through `client` (Prefect's sync client); True once a stop was asked."""
        if self.asked:
            return True
        try:
            state = client.read_flow_run(self.flow_run_id).state
        except Exception as e:  # the server is away (restart, network): try again at the next poll
            if not self.unreachable:
                log.warning("%s: cannot read the state of flow run %s (%s: %s); a cancel is noticed once "
                            "the server answers again", self.purpose, self.flow_run_id, type(e).__name__, e)
            self.unreachable = True
            return False
        if self.unreachable:
            log.info("%s: the server answers again; watching flow run %s for a cancel", self.purpose, self.flow_run_id)
            self.unreachable = False
        if state is not None and state.type.value in CANCEL_STATES:
            self.asked = True
            request_stop(f"{self.purpose}: flow run {self.flow_run_id} is {state.name}")
        return self.asked
