"""Every flow's parameters are typed and described: the Prefect run form, the CLI and the config agree."""

from __future__ import annotations

import importlib
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from tagdit.orchestrate.params import Preset, flow_config

ROOT = Path(__file__).resolve().parents[1]
FLOWS = {  # module -> (flow object name, the stages its `force` offers)
    "demo_world": ("demo_world_flow", ["demo-world"]),
    "prepare_data": ("prepare_data_flow", ["crop", "tag", "shard"]),
    "train_vae": ("train_vae_flow", ["train-vae"]),
    "encode": ("encode_flow", ["encode"]),
    "train_dit": ("train_dit_flow", ["train-dit"]),
    "evaluate": ("evaluate_flow", ["evaluate"]),
    "full_pipeline": ("full_pipeline_flow",
                      ["demo-world", "crop", "tag", "shard", "train-vae", "encode", "train-dit", "evaluate"]),
    "export": ("export_flow", None),
}


def schema(module: str) -> dict:
    name, _ = FLOWS[module]
    return getattr(importlib.import_module(f"flows.{module}"), name).parameters.model_dump_for_openapi()


@pytest.mark.parametrize("module", sorted(FLOWS))
def test_every_parameter_is_typed_and_described(module):
    props = schema(module)["properties"]
    assert {"config", "overrides"} <= props.keys()
    for name, prop in props.items():
        assert prop.get("description"), f"{module}.{name} has no description"
        assert prop.get("anyOf") or prop.get("type"), f"{module}.{name} has no type"
        assert {"type": "null"} not in prop.get("anyOf", []), f"{module}.{name} would show 'Property is type None'"
        assert "<" not in prop["description"], f"{module}.{name}: the UI renders <...> as HTML"
    config = props["config"]["anyOf"]
    assert config[0]["enum"] == list(typing.get_args(Preset)) and config[1]["pattern"]
    if FLOWS[module][1] is not None:  # export has no stages to force
        force_items = props["force"]["items"]
        assert force_items.get("enum", [force_items.get("const")]) == FLOWS[module][1]


def test_empty_typed_settings_say_what_each_preset_runs_with():
    props = schema("full_pipeline")["properties"]
    demo, original = flow_config("demo", None), flow_config("original-256", None)
    assert f"demo: {demo.dit.train.steps}; original-256: {original.dit.train.steps}" in props["dit_steps"]["description"]
    assert f"demo: {demo.run.name};" in props["run"]["description"]
    sampler = schema("evaluate")["properties"]["sampler"]["description"]
    assert "demo: " + ", ".join(s.name for s in demo.evaluate.samplers) in sampler


def create(parameters: dict, module: str = "train_dit") -> str:
    """What the Prefect server answers when a run with these parameters is created: "" if accepted."""
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    try:
        validate(parameters, schema(module), raise_on_error=True)  # as the server's create_flow_run does
    except ValidationError as e:
        return str(e)
    return ""


def test_the_server_refuses_an_unknown_override_key_naming_the_closest_one():
    assert "'dit.train.stpes=5' does not match '^\\\\s*dit\\\\.train\\\\.steps(" in create(
        {"overrides": ["dit.train.lr=2e-4", "dit.train.stpes=5"]})
    far = create({"overrides": ["vae.model.depht=3"]})  # nothing near: the section's keys are listed
    assert "'vae.model.depht=3' does not match" in far and "|blocks_per_level|" in far
    from prefect.utilities.schema_tools.validation import validate

    errors = validate({"overrides": ["dti.x=1", "dit.train.steps", "data.name=ok"], "dit_steps": None},
                      schema("train_dit"))  # every error at once: a misspelt section, no value, an explicit null
    assert {e.json_path for e in errors} == {"$.overrides[0]", "$.overrides[1]", "$.dit_steps"}


def test_every_config_key_passes_the_servers_override_check():
    def keys(tree: dict, prefix: str = "") -> list[str]:
        return [k for name, v in tree.items()
                for k in (keys(v, f"{prefix}{name}.") if isinstance(v, dict) and v else [f"{prefix}{name}"])]

    every = keys(flow_config("demo", None).model_dump())
    assert len(every) > 100 and "dit.train.steps" in every
    renamed_and_whole = ["evaluate.cfg=3", "vae.model=demo", ' dit.train.lr = 2e-4', "evaluate.samplers=[]"]
    assert create({"overrides": [f"{k}=1" for k in every] + renamed_and_whole}) == ""


def test_every_deployment_is_described_and_tagged():
    import yaml

    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert len(deployments) == 10
    for d in deployments:
        where = f"{d['entrypoint']} {d['name']}"
        assert d.get("description") and "<" not in d["description"] and d.get("tags"), where
    nightly = next(d for d in deployments if d["name"] == "nightly")
    assert nightly["schedules"][0]["slug"] and "nightly" in nightly["tags"]


def test_the_preset_choices_are_the_configs_folder():
    assert sorted(typing.get_args(Preset)) == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert flow_config("demo", None) == flow_config(str(ROOT / "configs/demo.yaml"), None)


def test_typed_settings_set_their_keys_and_win_over_overrides():
    cfg = flow_config("demo", ["run.name=from-overrides", "dit.train.lr=2e-4"], run="exp-7", dataset="faces",
                      source="/data/my images", vae_steps=30, dit_steps=40, gpus=2, cfg_scale=3.5)
    assert (cfg.run.name, cfg.data.name, str(cfg.data.source)) == ("exp-7", "faces", "/data/my images")
    assert (cfg.vae.train.steps, cfg.dit.train.steps, cfg.vae.train.nproc, cfg.dit.train.nproc) == (30, 40, 2, 2)
    assert cfg.evaluate.cfg_scale == 3.5 and cfg.dit.train.lr == 2e-4
    ddpm = flow_config("demo", None, sampler="ddpm", sampling_steps=30).evaluate.samplers
    assert [(s.name, s.sampler, s.steps, s.eta) for s in ddpm] == [("ddpm30", "ddim", 30, 1.0)]
    steps_only = flow_config("demo", None, sampling_steps=20).evaluate.samplers
    assert [(s.sampler, s.steps, s.eta) for s in steps_only] == [("ddim", 20, 0.0)]


def test_the_cli_offers_the_same_choices_and_bounds(capsys):
    from flows import evaluate, train_dit

    for argv, message in ((["--force", "trian_dit"], "invalid choice: 'trian_dit'"),
                          (["--dit-steps", "0"], "below the minimum 1")):
        with pytest.raises(SystemExit) as e:
            train_dit.main(["--config", "demo", *argv])
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    help_text = capsys.readouterr().out
    for option in ("--run", "--sampler {ddim,ddpm,dpmpp_2m}", "--sampling-steps", "--cfg-scale", "--nightly"):
        assert option in help_text


def test_the_tagdit_command_is_the_short_form():
    tagdit = str(Path(sys.executable).with_name("tagdit"))  # the installed entry point, once (each start imports Prefect)
    run = subprocess.run([tagdit, "run", "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "usage: tagdit run" in run.stdout and "--dit-steps" in run.stdout


@pytest.mark.parametrize("argv, status, out, err", [
    (["stage", "train-dit", "--force", "trian_dit"], 2, "", "invalid choice: 'trian_dit'"),
    (["stage", "trian-dit"], 2, "", "did you mean 'train-dit'"),
    (["stage", "train_dit", "--help"], 0, "--dit-steps", "is spelled 'train-dit'"),  # the other spelling, with a hint
    (["stage", "--help"], 0, "prepare-data", ""),
    (["smaple"], 2, "", "did you mean 'sample'"),
    (["--version"], 0, "tagdit 0.1.0", ""),
])
def test_the_tagdit_command_refuses_with_one_line_and_helps(argv, status, out, err, capsys):
    from flows import command

    try:
        code = command.main(argv)
    except SystemExit as e:  # argparse's own exits (help, refused options)
        code = e.code
    captured = capsys.readouterr()
    assert code == status and out in captured.out and err in captured.err


def test_the_tagdit_command_returns_a_status_not_the_result(monkeypatch, capsys):
    from flows import command, sample

    monkeypatch.setattr(sample, "main", lambda argv: {"out": "x.png"})  # a result dict must not become exit 1
    assert command.main(["sample", "--prompt", "smile"]) == 0

    def broken(argv):
        raise FileNotFoundError("no checkpoint under runs/x/dit")

    monkeypatch.setattr(sample, "main", broken)
    assert command.main(["sample", "--prompt", "smile"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tagdit sample: failed: FileNotFoundError: no checkpoint under runs/x/dit "
                   "(TAGDIT_TRACEBACK=1 shows where)"]
    assert command.main(["--help"]) == 0


def test_a_nightly_is_skipped_while_the_previous_one_runs(prefect_env, tmp_path):
    from flows.evaluate import NIGHTLY_LOCK, evaluate_flow

    lock = tmp_path / "runs/tiny" / NIGHTLY_LOCK
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, json, sys, time\n"
        f"f = open({str(lock)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write(json.dumps({'since': 'earlier', 'flow_run_name': 'evaluate · tiny'})); f.flush()\n"
        "print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        state = evaluate_flow(overrides=[f"run.root={tmp_path / 'runs'}"], run="tiny", nightly=True,
                              return_state=True)
        assert state.is_cancelled() and "evaluate · tiny" in state.message and "skipped" in state.message
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (however it ended): the next nightly goes ahead (and fails here: no checkpoint)
    state = evaluate_flow(overrides=[f"run.root={tmp_path / 'runs'}"], run="tiny", nightly=True, return_state=True)
    assert state.is_failed() and "checkpoint" in str(state.message).lower()


def test_a_flow_process_starts_prefect_without_telemetry():
    """A first ephemeral run printed the telemetry service's "database is locked" traceback."""
    import os

    code = ("import flows\nfrom prefect.settings import get_current_settings\n"
            "print(get_current_settings().server.analytics_enabled)")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_ANALYTICS_ENABLED"}  # as a user's shell
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "False", run.stderr[-2000:]
