"""Flow-run names that say what a run is: `train-dit · demo` instead of `loutish-muskrat`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from tagdit.orchestrate.params import flow_config, typed_settings


def run_namer(flow_name: str, folder: Literal["run", "dataset"] = "run") -> Callable[[], str]:
    """A `flow_run_name` for `@flow`: the flow's name and its run's (or dataset's) name from its own parameters.

    A config that does not load names the run after the flow alone; the flow itself reports the error.
    """

    def name() -> str:
        from prefect.runtime import flow_run

        params = flow_run.parameters
        try:
            cfg = flow_config(params.get("config"), params.get("overrides"), **typed_settings(params))
        except Exception:
            return flow_name
        return f"{flow_name} · {cfg.data.name if folder == 'dataset' else cfg.run.name}"

    return name
