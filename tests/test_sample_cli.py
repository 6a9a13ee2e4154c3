"""The sample command: plain text-to-image, img2img from an image file, seed/prompt interpolation."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from flows import sample
from tagdit.config import SamplerConfig
from tagdit.sampling.painter import read_image
from tasks.records import painter_for_run
from tests.numerics import assert_images_close
from tests.run_fixtures import sample_args

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = SamplerConfig(name="t", steps=3)


def tiles(path, n, tile=64, pad=4, header=16):
    """The n images of a one-row grid written by render_grid, as arrays."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    return [grid[header:header + tile, pad + j * (tile + pad):pad + j * (tile + pad) + tile] for j in range(n)]


@pytest.fixture
def photo(tmp_path):
    """A 90x60 RGBA image with a transparent corner: centre-cropped and put on white for img2img."""
    a = np.random.default_rng(0).integers(0, 255, (60, 90, 4), dtype=np.uint8)
    a[..., 3] = 255
    a[:10, :10, 3] = 0
    path = tmp_path / "init.png"
    Image.fromarray(a, "RGBA").save(path)
    return path


def test_sample_command_writes_images_and_reports_unknown_tags(tiny_run, tmp_path, caplog):
    out = tmp_path / "out.png"
    args = sample_args(tiny_run, "--prompt", "red hair, Smile, purple_cape", "--negative", "hat",
                       "--cfg", "3", "--steps", "4", "--eta", "1", "--n", "2", "--out", str(out))
    with caplog.at_level(logging.WARNING):
        result = sample.main(args)
    assert Image.open(out).size[0] >= 2 * 64
    assert result["unknown_tags"] == ["purple_cape"] and "purple_cape" in caplog.text


def test_the_installed_command_draws_from_a_run_quietly(tiny_run, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    tagdit = str(Path(sys.executable).with_name("tagdit"))
    done = subprocess.run([tagdit, "sample", *sample_args(tiny_run, "--prompt", "smile", "--sampling-steps", "2",
                                                          "--n", "1", "--out", str(tmp_path / "o.png"))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and (tmp_path / "o.png").is_file(), done.stderr
    assert "without a flow run id" not in done.stderr  # Prefect's API handler stays out of commands that run no flow


@pytest.mark.numerics
def test_each_png_carries_its_parameters_and_a_seeds_own_file_redraws_alone(tiny_run, tmp_path):
    from tagdit.formats.png_parameters import read_parameters

    common = ["--prompt", "red hair, smile", "--cfg", "3", "--steps", "2", "--eta", "0.5"]
    result = sample.main(sample_args(tiny_run, *common, "--negative", "hat", "--n", "2", "--seed", "5", "--per-seed",
                                     "--out", str(tmp_path / "row.png")))
    assert result["files"] == [str(tmp_path / "row-seed5.png"), str(tmp_path / "row-seed6.png")]
    own = read_parameters(tmp_path / "row-seed6.png")
    assert own == {"prompt": "red hair, smile", "negative": "hat", "Steps": "2", "Sampler": "DDIM", "CFG scale": "3",
                   "Seed": "6", "Size": "64x64", "Model": own["Model"], "Eta DDIM": "0.5"}
    assert own["Model"].endswith("/ckpt-0000004") and Image.open(tmp_path / "row-seed6.png").size == (64, 64)
    row = read_parameters(tmp_path / "row.png")
    assert (row["Seed"], row["Batch size"]) == ("5", "2")
    sample.main(sample_args(tiny_run, *common, "--negative", "hat", "--n", "1", "--seed", "6", "--per-seed",
                            "--out", str(tmp_path / "alone.png")))  # what the file says redraws it
    assert_images_close(Image.open(tmp_path / "alone-seed6.png"), Image.open(tmp_path / "row-seed6.png"))
    sample.main(sample_args(tiny_run, "--prompt", "smile", "--steps", "2", "--n", "1", "--out", str(tmp_path / "p.png")))
    plain = read_parameters(tmp_path / "p.png")
    assert plain["negative"] == "" and "Negative prompt" not in Image.open(tmp_path / "p.png").text["parameters"]
    assert (plain["Seed"], plain["Batch noise"]) == ("0", "one generator")
    assert not list(tmp_path.glob("p-seed*.png"))  # one file per seed only on request


def test_ddpm_is_ddim_with_eta_one_in_every_tool(tiny_run, tmp_path):
    common = ["--prompt", "smile, hat", "--steps", "3", "--n", "2", "--seed", "4"]
    sample.main(sample_args(tiny_run, *common, "--sampler", "ddpm", "--out", str(tmp_path / "ddpm.png")))
    sample.main(sample_args(tiny_run, *common, "--sampler", "ddim", "--eta", "1", "--out", str(tmp_path / "eta1.png")))
    assert np.array_equal(tiles(tmp_path / "ddpm.png", 2), tiles(tmp_path / "eta1.png", 2))


@pytest.mark.numerics
def test_strength_one_is_plain_sampling_with_the_same_seed(tiny_run, tmp_path, photo):
    common = ["--prompt", "smile, hat", "--steps", "3", "--n", "2", "--seed", "5"]
    sample.main(sample_args(tiny_run, *common, "--out", str(tmp_path / "plain.png")))
    sample.main(sample_args(tiny_run, *common, "--init-image", str(photo), "--strength", "1",
                            "--out", str(tmp_path / "i2i.png")))
    plain, i2i = tiles(tmp_path / "plain.png", 2), tiles(tmp_path / "i2i.png", 2)
    assert all(np.array_equal(a, b) for a, b in zip(plain, i2i, strict=True))
    assert not np.array_equal(plain[0], plain[1])  # each image its own noise


@pytest.mark.numerics
def test_strength_zero_is_the_vae_round_trip_of_the_centre_crop(tiny_run, tmp_path, photo):
    sample.main(sample_args(tiny_run, "--prompt", "smile", "--steps", "3", "--n", "1", "--init-image", str(photo),
                            "--strength", "0", "--out", str(tmp_path / "s0.png")))
    painter = painter_for_run(tiny_run)
    z = painter.encode_image(read_image(photo.read_bytes()))
    assert z.shape == (1, *painter.stats.latent_shape)
    assert np.array_equal(tiles(tmp_path / "s0.png", 1)[0], np.asarray(painter.decode(z)[0]))


@pytest.mark.numerics
def test_img2img_sees_only_the_centre_square_composited_on_white(tiny_run):
    painter = painter_for_run(tiny_run)
    rgb = np.random.default_rng(1).integers(0, 255, (60, 90, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((60, 90, 1), 255, np.uint8)], axis=2)
    rgba[20:30, 40:50] = (7, 200, 9, 0)  # transparent: white, whatever its colour
    rgb[20:30, 40:50] = 255
    other = rgba.copy()
    other[:, :8] = other[:, -8:] = 0  # well outside the centre 60x60 square (and the resize filter's reach)
    z = [painter.encode_image(Image.fromarray(a)) for a in (rgb, rgba, other)]
    assert painter.resolution == 64 and torch.equal(z[0], z[1]) and torch.equal(z[1], z[2])
    rgb[30, 45] = 0
    assert not torch.equal(painter.encode_image(Image.fromarray(rgb)), z[0])


@pytest.mark.numerics
def test_interpolation_writes_a_strip_and_an_animation_whose_ends_are_the_plain_samples(tiny_run, tmp_path):
    out = tmp_path / "interp.png"
    result = sample.main(sample_args(tiny_run, "--prompt", "smile", "--interpolate-prompt", "red hair, hat",
                                     "--interpolate-seeds", "3", "9", "--frames", "4", "--steps", "3",
                                     "--out", str(out)))
    frames = tiles(out, 4)
    anim = Image.open(result["animation"])
    assert result["animation"] == str(tmp_path / "interp.gif") and anim.n_frames == 4 + 2  # there and back
    painter = painter_for_run(tiny_run)
    ends = [painter.sample(painter.parse(p)[0], painter.parse("")[0], SamplerConfig(name="t", steps=3), 4.0, s, 1)[0]
            for p, s in (("smile", 3), ("red hair, hat", 9))]
    for got, want in ((frames[0], ends[0]), (frames[-1], ends[1])):
        assert_images_close(got, want)  # a batch of 4 frames vs 1 sample
    assert not np.array_equal(frames[1], frames[0]) and not np.array_equal(frames[1], frames[-1])


def test_seed_only_interpolation_keeps_the_prompt(tiny_run, tmp_path):
    out = tmp_path / "seeds.png"
    sample.main(sample_args(tiny_run, "--prompt", "smile", "--interpolate-seeds", "0", "1", "--frames", "3",
                            "--steps", "2", "--out", str(out)))
    assert Image.open(out).size[0] == 3 * 68 + 4 and Image.open(tmp_path / "seeds.gif").n_frames == 4


@pytest.mark.parametrize("extra, message", [
    (["--init-image", "x.png", "--interpolate-seeds", "0", "1"], "cannot be combined"),
    (["--init-image", "x.png", "--strength", "1.5"], "--strength must be in [0, 1]"),
    (["--sampler", "dpmpp_2m", "--eta", "1"], "ddim sampler only"),
    (["--interpolate-seeds", "0", "1", "--frames", "1"], "at least 2"),
    (["--steps", "-5"], "--steps: -5 is below the minimum 1"),  # refused before any model loads
    (["--n", "0"], "--n: 0 is below the minimum 1"),
    (["--cfg", "-3"], "--cfg: -3.0 is below the minimum 0"),
])
def test_bad_flag_combinations_are_refused_with_a_message(extra, message, capsys):
    with pytest.raises(SystemExit):
        sample.main(["--prompt", "smile", *extra])
    assert message in capsys.readouterr().err


def test_an_unreadable_init_image_is_a_clear_error(tiny_run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="not a readable image"):
        sample.main(sample_args(tiny_run, "--prompt", "smile", "--init-image", str(bad), "--out", str(tmp_path / "o.png")))
