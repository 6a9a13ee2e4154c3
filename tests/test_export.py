"""The export flow: a trained run -> one folder that draws on its own (sample CLI, from_pretrained, the Hub)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import tagdit
from flows import export, sample
from tagdit.formats.eval_metrics import EvalMetrics, Fidelity
from tagdit.formats.exported_model import (
    DiTModel,
    VAEModel,
    check_destination,
    model_folder,
    weights_metadata,
)
from tagdit.formats.model_card import _public_url
from tagdit.formats.trained_models import load_dit, load_vae
from tagdit.sampling.methods import sampler_method
from tasks.records import latest_evaluation, painter_for_run, run_files, training_settings
from tests.run_fixtures import TINY, latents_with_vae, sample_args

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
PROMPT = ["--prompt", "smile, hat", "--negative", "red hair", "--cfg", "3", "--steps", "3", "--eta", "1",
          "--n", "2", "--seed", "5"]


def config_args(cfg, *extra: str) -> list[str]:
    """The run's command-line settings (its tiny DiT too, so the card lists what was trained)."""
    return sample_args(cfg, *(a for o in TINY for a in ("--set", o)), *extra)


def fake_evaluation(folder: Path, checkpoint: str, step: int, recall: float) -> Path:
    """An evaluation folder as the evaluate stage leaves it: one grid and metrics.json."""
    folder.mkdir(parents=True)
    Image.new("RGB", (20, 10), (200, 30, 30)).save(folder / "grid-ddim3.png")
    fid = Fidelity(recall=recall, precision=0.5, n=4)
    EvalMetrics(dit_checkpoint=checkpoint, dit_step=step, sampler="ddim3", cfg_scale=3.0, cfg=fid, unconditional=fid,
                real=fid, reconstructed=fid, tag_recall_ratio=recall / 0.5, kid_tagger={"cfg": 0.01, "unconditional": 0.1},
                vae_psnr_db=21.5, dit_val_loss=0.25, prompts=["smile, hat"],
                grids={"ddim3": os.path.relpath(folder / "grid-ddim3.png")}).write(folder / "metrics.json")  # as evaluate
    # records it: relative to the working directory (run.root is relative in the presets)
    return folder


@pytest.fixture(scope="module")
def evaluated_run(tiny_run, tmp_path_factory):
    """A copy of the tiny run's folder with two evaluations: of its checkpoint, and a later step's (a stray)."""
    root = tmp_path_factory.mktemp("evaluated") / "runs"
    shutil.copytree(tiny_run.run_dir, root / tiny_run.run.name)
    cfg = tiny_run.model_copy(update={"run": tiny_run.run.model_copy(update={"root": root})})
    ckpt = run_files(cfg).dit_checkpoint.name
    fake_evaluation(cfg.run_dir / "eval" / f"{ckpt}-aaaa", ckpt, 4, recall=0.75)
    fake_evaluation(cfg.run_dir / "eval" / "ckpt-0000009-bbbb", "ckpt-0000009", 9, recall=0.1)
    return cfg


@pytest.fixture(scope="module")
def exported(evaluated_run, tmp_path_factory) -> Path:
    return Path(export.export_run(evaluated_run, tmp_path_factory.mktemp("exp") / "model")["folder"])


def grid_pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def hub_stand_in(cache: Path, repo_id: str, folder: Path, subfolder: str, revision: str = "main") -> Path:
    """A Hugging Face cache holding `folder` as `subfolder` of model repository `repo_id` at `revision`, laid
    out as snapshot_download leaves it: with HF_HUB_OFFLINE=1 (tests/conftest.py) this cache is the Hub."""
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit / subfolder)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return repo / "snapshots" / commit


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_exported_folder_alone_draws_the_runs_image_in_another_process(prefect_env, evaluated_run, monkeypatch):
    calls = []

    class FakeHfApi:  # the upload cannot run here: record what would be sent
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))
            return f"https://huggingface.co/{repo_id}"

        def create_branch(self, repo_id, **kw):
            calls.append(("create_branch", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw["repo_id"], kw))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeHfApi)
    folder = prefect_env / "exported"
    result = export.main(config_args(evaluated_run, "--to", str(folder), "--push", "me/tagdit-tiny", "--private",
                                     "--revision", "v1", "--commit-message", "tiny, step 4"))
    assert result["url"] == "https://huggingface.co/me/tagdit-tiny/tree/v1"
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][2]["private"] is True and calls[0][2]["exist_ok"] and calls[1][2]["branch"] == "v1"
    upload = calls[2][2]
    assert Path(upload["folder_path"]) == folder.absolute()
    assert upload["revision"] == "v1" and upload["commit_message"] == "tiny, step 4"
    assert 'tagdit.from_pretrained("me/tagdit-tiny")' in (folder / "README.md").read_text()  # the card names the repo

    # the folder as the Hub serves it (branch v1, in a subfolder), drawn by a fresh process that sees no config
    # and no run: `--model user/name` through snapshot_download, its cache standing in for the Hub
    hub_stand_in(prefect_env / "hub", "me/tagdit-tiny", folder, "tiny", revision="v1")
    shutil.rmtree(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the same kernels as one_thread here
    env.update(HF_HUB_CACHE=str(prefect_env / "hub"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = prefect_env / "from-model.png"
    tagdit_command = str(Path(sys.executable).with_name("tagdit"))  # the installed command: exit status 0 on success
    model = ["--model", "me/tagdit-tiny", "--revision", "v1", "--subfolder", "tiny"]
    done = subprocess.run([tagdit_command, "sample", *model, "--device", "cpu", *PROMPT, "--out", str(out)],
                          cwd=prefect_env, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    sample.main(sample_args(evaluated_run, *PROMPT, "--out", str(prefect_env / "from-run.png")))
    assert np.array_equal(grid_pixels(out), grid_pixels(prefect_env / "from-run.png"))


def test_each_model_loads_with_from_pretrained_as_the_runs_ema_weights(evaluated_run, exported):
    files = run_files(evaluated_run)
    for hub_class, folder, trained in ((DiTModel, "dit", load_dit(files.dit_checkpoint)),
                                       (VAEModel, "vae", load_vae(files.vae_checkpoint)[0])):
        model = hub_class.from_pretrained(exported / folder)
        ours, theirs = model.state_dict(), trained.state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert not model.training and sorted(p.name for p in (exported / folder).iterdir()) == [
            "config.json", "model.safetensors"]
    assert json.loads((exported / "dit" / "config.json").read_text())["schedule"] == "cosine"
    index = json.loads((exported / "tagdit.json").read_text())
    assert index["resolution"] == 64 and index["latent_shape"] == [4, 8, 8] and index["timesteps"] == 1000
    assert (exported / "vocab.json").read_bytes() == files.vocab.read_bytes()
    stats = json.loads((files.latents_dir / "stats.json").read_text())
    assert json.loads((exported / "stats.json").read_text()) == {**stats, "vae_checkpoint": "vae"}  # no local path


def test_model_card_shows_the_exported_checkpoints_evaluation_and_training_settings(exported):
    card = (exported / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: tagdit" in card
    assert "![ddim3](grid-ddim3.png)" in card and (exported / "grid-ddim3.png").is_file()
    assert "| tag recall ratio (CFG recall / real images' recall) | 1.500 |" in card  # the checkpoint's, not step 9's
    assert "not the exported checkpoint" not in card and "width: 64" in card and "lr: 0.002" in card
    assert json.loads((exported / "metrics.json").read_text())["grids"] == {"ddim3": "grid-ddim3.png"}
    assert EvalMetrics.read(exported / "metrics.json").grids == {"ddim3": str(exported / "grid-ddim3.png")}
    assert "license: apache-2.0" in card


def test_latest_evaluation_prefers_the_exported_checkpoint(evaluated_run):
    ckpt = run_files(evaluated_run).dit_checkpoint
    assert latest_evaluation(evaluated_run, ckpt).name == f"{ckpt.name}-aaaa"
    assert latest_evaluation(evaluated_run, ckpt.with_name("ckpt-0000099")).name == "ckpt-0000009-bbbb"


def test_a_run_without_a_dit_checkpoint_is_refused_with_the_flow_to_run(tmp_path, capsys):
    latents_with_vae(tmp_path)  # VAE and latents stamped, no DiT trained
    args = ["--set", f"data.root={tmp_path}", "--set", "data.name=ds", "--set", f"run.root={tmp_path}/runs"]
    with pytest.raises(SystemExit) as e:
        export.main([*args, "--to", str(tmp_path / "out")])
    assert e.value.code == 2 and "run train-dit first" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_destination_is_replaced_only_when_it_is_an_earlier_export(tmp_path, exported, evaluated_run, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        export.main(config_args(evaluated_run, "--to", str(busy)))
    assert "exists and is not empty" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="holds no earlier export"):
        check_destination(busy, overwrite=True)
    assert (busy / "notes.txt").read_text() == "mine"
    check_destination(tmp_path / "absent")
    check_destination(exported, overwrite=True)  # an earlier export may be replaced
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_destination(exported)


@pytest.mark.parametrize("extra, message", [
    (["--config", "configs/demo.yaml"], "alone: drop --config"),
    (["--checkpoint", "x"], "alone: drop --config"),
])
def test_model_excludes_the_run_options(extra, message, exported, capsys):
    with pytest.raises(SystemExit):
        sample.main(["--prompt", "smile", "--model", str(exported), *extra])
    assert message in capsys.readouterr().err


def test_a_folder_that_is_no_export_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.main(["--prompt", "smile", "--model", str(tmp_path)])
    assert "not an exported tagdit model" in capsys.readouterr().err


def test_serve_draws_from_the_exported_folder(exported, tmp_path, monkeypatch):
    import uvicorn

    from flows import serve

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.chdir(tmp_path)
    serve.main(["--model", str(exported), "--device", "cpu"])
    studio = seen["app"].state.studio
    assert studio.painter.checkpoint == exported and studio.out_dir == Path("samples-web")
    assert studio.painter.resolution == 64 and "smile" in studio.tags


def test_from_pretrained_by_repo_id_draws_the_runs_images_in_one_call(evaluated_run, exported, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = hub_stand_in(tmp_path / "hub", "me/tagdit-tiny", exported, "tiny")
    model = tagdit.from_pretrained("me/tagdit-tiny", subfolder="tiny", device="cpu")
    assert model.painter.checkpoint == snapshot / "tiny"
    index = json.loads((exported / "tagdit.json").read_text())  # its defaults: the export's suggested settings
    assert (model.steps, model.cfg_scale) == (index["sampler"]["steps"], index["cfg_scale"])
    images = model("smile, hat", negative_prompt="red hair", steps=3, cfg_scale=3.0, seed=5, n=2, sampler="ddpm")

    run = painter_for_run(evaluated_run)  # the run's own checkpoints, not the export
    (cond, _), (neg, _) = run.parse("smile, hat"), run.parse("red hair")
    expected = run.sample(cond, neg, sampler_method("ddpm", 3), 3.0, 5, 2)
    assert len(images) == 2 and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, expected, strict=True))

    dit = DiTModel.from_pretrained("me/tagdit-tiny", subfolder="tiny/dit")  # one network, as huggingface_hub loads
    assert all(torch.equal(a, b) for a, b in zip(dit.state_dict().values(), run.dit.state_dict().values(), strict=True))


def test_a_model_that_is_neither_folder_nor_repo_is_refused_in_one_line(tmp_path, exported, capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="neither a folder nor a Hub repository id"):
        model_folder(tmp_path / "absent" / "deep")
    with pytest.raises(ValueError, match="applies to a Hub repository"):
        model_folder(exported, revision="v1")
    with pytest.raises(SystemExit) as e:
        sample.main(["--prompt", "smile", "--model", "me/not-there"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--model: me/not-there is no local folder, and the Hub gave no model repository" in err


def test_weights_carry_tagdit_version_step_and_config_hash(evaluated_run, exported):
    from safetensors import safe_open

    settings = training_settings(run_files(evaluated_run))
    for name in ("dit", "vae"):
        with safe_open(str(exported / name / "model.safetensors"), "pt") as f:
            meta = f.metadata()
        assert meta == {"format": "pt", **weights_metadata(settings[name])}
        assert meta["tagdit_version"] == tagdit.__version__ and meta["step"] == str(settings[name]["steps"])
        assert len(meta["config_sha256"]) == 64
    assert json.loads((exported / "tagdit.json").read_text())["source"]["dit_step"] == settings["dit"]["steps"]
    assert weights_metadata({**settings["dit"], "lr": 1.0})["config_sha256"] != weights_metadata(settings["dit"])[
        "config_sha256"]


def test_scheduler_config_gives_diffusers_the_clamped_cosine_as_trained_betas(exported):
    config = json.loads((exported / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "DDIMScheduler" and config["prediction_type"] == "epsilon"
    assert set(config) == {"_class_name", "_diffusers_version", "num_train_timesteps", "beta_start", "beta_end",
                           "beta_schedule", "trained_betas", "prediction_type", "clip_sample", "set_alpha_to_one",
                           "steps_offset", "thresholding", "timestep_spacing", "rescale_betas_zero_snr"}
    betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
    alpha_bar = DiTModel.from_pretrained(exported / "dit").alpha_bar
    assert config["num_train_timesteps"] == len(betas) == 1000
    assert torch.allclose(torch.cumprod(1 - betas, 0), alpha_bar, rtol=1e-12, atol=0)
    assert abs(float(alpha_bar[-1]) - 0.001) < 1e-12  # clamped: ᾱ ends at 0.001, not 0


def test_card_front_matter_holds_license_results_and_credits(exported, evaluated_run, tmp_path):
    card = (exported / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "tagdit"
    assert meta["pipeline_tag"] == "text-to-image"
    assert meta["tags"] == ["tagdit", "diffusion-transformer", "latent-diffusion", "tag-to-image"]
    assert "datasets" not in meta  # the run names no Hub dataset
    results = meta["model-index"][0]["results"]
    metrics = {(m["type"], m["value"]) for r in results for m in r["metrics"]}
    assert ("tag-recall-ratio", 1.5) in metrics and ("kid", 0.01) in metrics
    assert "Cosmic1Neko/Diffusion-Transformer-DiT-in-R-Tensorflow" in card
    assert "SmilingWolf/wd-v1-4-moat-tagger-v2" in card and "python -m flows" not in card
    assert 'model = tagdit.from_pretrained("path/to/this/folder")' in card
    assert f"Code: tagdit {tagdit.__version__}" in card or "Code: [tagdit](" in card

    named = export.export_run(evaluated_run, tmp_path / "named", repo_id="me/tagdit-tiny", hub_dataset="me/images")
    meta = front_matter((Path(named["folder"]) / "README.md").read_text())
    assert meta["datasets"] == ["me/images"] and meta["model-index"][0]["results"][0]["dataset"]["type"] == "me/images"


@pytest.mark.parametrize("remote, url", [
    ("git@github.com:someone/tagdit.git", "https://github.com/someone/tagdit"),
    ("https://someone:ghp_secret@github.com/someone/tagdit.git", "https://github.com/someone/tagdit"),
    ("https://gitlab.example/group/tagdit", "https://gitlab.example/group/tagdit"),
])
def test_the_cards_code_link_never_carries_credentials(remote, url):
    assert _public_url(remote) == url


def test_push_options_without_push_are_refused(evaluated_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export.main(config_args(evaluated_run, "--to", str(tmp_path / "x"), "--private"))
    assert e.value.code == 2 and "apply to --push" in capsys.readouterr().err
