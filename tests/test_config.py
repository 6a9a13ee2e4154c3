from pathlib import Path

import pytest

from tagdit.config import ConfigError, load_config
from tagdit.orchestrate.cli import flow_main

ROOT = Path(__file__).resolve().parents[1]


def test_presets_load_with_the_seed_settings():
    seed = load_config(ROOT / "configs/original-256.yaml")
    assert seed.data.resolution == 256
    assert seed.vae.model.widths == [80, 160, 320] and seed.vae.model.z_channels == 4
    m = seed.dit.model
    assert (m.patch, m.width, m.depth, m.heads, m.mlp_ratio) == (2, 1024, 16, 16, 2.0)
    assert seed.dit.train.lr == 5e-5 and seed.vae.train.lr == 1e-4
    demo = load_config(ROOT / "configs/demo.yaml")
    assert demo.data.resolution == 64 and demo.demo.enabled


def test_required_keys_exist_with_their_names():
    cfg = load_config(None, ["data.source=/x", "data.name=d", "data.root=s", "run.name=r", "run.root=q"])
    assert (str(cfg.data.source), cfg.data.name, str(cfg.data.root)) == ("/x", "d", "s")
    assert (cfg.run.name, str(cfg.run.root)) == ("r", "q")
    assert cfg.dataset_dir == Path("s/d") and cfg.run_dir == Path("q/r")


def test_overrides_parse_yaml_values_and_keep_preset_defaults():
    cfg = load_config(ROOT / "configs/demo.yaml", ["dit.model.depth=2", "evaluate.seeds=[5, 6]"])
    assert cfg.dit.model.depth == 2 and cfg.dit.model.width == 256  # rest of the demo preset kept
    assert cfg.evaluate.seeds == [5, 6]


def test_partial_train_section_keeps_the_stage_defaults():
    cfg = load_config(None, ["dit.train.batch_size=8"])
    assert cfg.dit.train.lr == 5e-5 and cfg.dit.train.warmup_steps == 10_000


@pytest.mark.parametrize(
    "override, key",
    [
        ("dit.modle.depth=2", "dit.modle"),
        ("nope=1", "nope"),
        ("vae.train.lr=-1", "vae.train.lr"),
        ("data.resolution=abc", "data.resolution"),
        ("crop.mode=diagonal", "crop.mode"),
        ("vae.model=huge", "vae.model"),
    ],
)
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(ROOT / "configs/demo.yaml", [override])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_rejects_unknown_key_before_running(capsys):
    called = []
    with pytest.raises(SystemExit) as e:
        flow_main(lambda **kw: called.append(kw), "x", ["--set", "run.nam=3"])
    assert e.value.code == 2 and not called
    assert "run.nam" in capsys.readouterr().err


def test_a_misspelt_key_is_refused_with_the_closest_one():
    with pytest.raises(ConfigError, match="did you mean 'dit.train.steps'"):
        load_config("demo", ["dit.train.stpes=5"])


def test_a_renamed_key_still_loads_under_its_new_name(tmp_path, caplog):
    old = tmp_path / "old.yaml"
    old.write_text("evaluate:\n  cfg: 3.5\n")
    assert load_config(old).evaluate.cfg_scale == 3.5
    assert load_config(None, ["evaluate.cfg=2.5"]).evaluate.cfg_scale == 2.5
    assert "evaluate.cfg is spelled evaluate.cfg_scale now" in caplog.text


def test_a_key_that_does_nothing_now_is_dropped_with_a_warning(caplog):
    assert load_config(None, ["crop.chunk_size=32", "crop.min_size=8"]).crop.min_size == 8
    assert "crop.chunk_size does nothing now" in caplog.text


def test_devices_are_auto_or_distinct_device_names_and_auto_uses_several_gpus_only():
    from tagdit.orchestrate.device_workers import local_devices

    assert load_config(None, []).prefect.devices == "auto"
    assert load_config(None, ["prefect.devices=[cuda:0,cuda:2]"]).prefect.devices == ["cuda:0", "cuda:2"]
    for bad in ("[gpu0]", "[cuda:0,cuda:0]", "[]", "cuda"):
        with pytest.raises(ConfigError, match="prefect.devices"):
            load_config(None, [f"prefect.devices={bad}"])
    assert local_devices("auto", 0) == local_devices("auto", 1) == [None]  # in this process, as before
    assert local_devices("auto", 3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert local_devices(["cpu:0", "cpu:1"], 8) == ["cpu:0", "cpu:1"]
