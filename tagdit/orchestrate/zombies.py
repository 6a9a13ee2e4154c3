"""Mark flow runs whose worker died as Crashed: a Prefect automation on missing heartbeats.

    PREFECT_FLOWS_HEARTBEAT_FREQUENCY=60 prefect worker start --pool tagdit   # on every worker
    python -m tagdit.orchestrate.zombies                                                  # once per server

A flow run from a deployment then sends a heartbeat event every 60 s; when none arrives for three
intervals (and the run did not finish), the automation sets it to Crashed. Re-running the deployment
resumes from its checkpoints, and its folder lock is taken back from the dead run (tagdit.orchestrate.locks).
"""

from __future__ import annotations

import argparse
from datetime import timedelta

NAME = "tagdit: crash zombie flow runs"


def zombie_automation(heartbeat_seconds: int = 60):
    """The automation: no heartbeat (nor a final state) within 3 heartbeats -> Crashed."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=NAME,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=3 * heartbeat_seconds),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {3 * heartbeat_seconds} s: the worker is gone")],
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Create the automation that marks zombie flow runs Crashed.")
    p.add_argument("--heartbeat-seconds", type=int, default=60, help="the workers' PREFECT_FLOWS_HEARTBEAT_FREQUENCY")
    a = p.parse_args(argv)
    from prefect.automations import Automation

    try:
        Automation.read(name=NAME)
        print(f"automation {NAME!r} exists already")
        return
    except ValueError:
        pass
    created = zombie_automation(a.heartbeat_seconds).create()
    print(f"created automation {created.name!r} ({created.id})")


if __name__ == "__main__":
    main()
