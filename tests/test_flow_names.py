"""Flow runs are named after what they run: `train-dit · <run>`, `prepare-data · <dataset>`."""

from __future__ import annotations

import pytest


def test_a_flow_run_is_named_after_its_run_or_dataset(prefect_env):
    from prefect import flow
    from prefect.runtime import flow_run

    from tagdit.orchestrate.naming import run_namer

    @flow(name="train-dit", flow_run_name=run_namer("train-dit"))
    def trains(config: str | None = None, overrides: list[str] | None = None) -> str:
        return flow_run.name

    @flow(name="prepare-data", flow_run_name=run_namer("prepare-data", "dataset"))
    def prepares(config: str | None = None, overrides: list[str] | None = None) -> str:
        return flow_run.name

    assert trains("configs/demo.yaml", ["run.name=exp-7"]) == "train-dit · exp-7"
    assert prepares("configs/demo.yaml", ["data.name=faces"]) == "prepare-data · faces"
    assert trains("configs/demo.yaml", ["no.such_key=1"]) == "train-dit"  # the flow reports the bad key itself


@pytest.mark.parametrize("module,name", [("demo_world", "demo-world"), ("prepare_data", "prepare-data"),
                                         ("train_vae", "train-vae"), ("encode", "encode"), ("train_dit", "train-dit"),
                                         ("evaluate", "evaluate"), ("full_pipeline", "full-pipeline"),
                                         ("export", "export")])
def test_every_flow_names_its_runs(module, name):
    import importlib

    flows = [v for v in vars(importlib.import_module(f"flows.{module}")).values() if getattr(v, "name", None) == name]
    assert flows and callable(flows[0].flow_run_name)
