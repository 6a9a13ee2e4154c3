"""sample: prompt (+ negative prompt) -> a row of generated images from the trained DiT.

    python -m flows.sample --prompt "blue hair, smile" --negative "hat" --cfg 4 --steps 50 --eta 0 \
        --seed 0 --n 4 --out out.png [--config configs/demo.yaml --set k=v] [--checkpoint DIR]
    ... --model DIR|USER/NAME [--revision R]          # an exported folder or Hub repo (flows.export), not a run
    ... --init-image photo.jpg --strength 0.6          # img2img: variations of an image's centre crop
    ... --interpolate-seeds 0 7 [--interpolate-prompt "red hair"] --frames 8
                                                       # a strip PNG + an animated GIF beside it

The checkpoint defaults to the run's latest EMA weights (`<run>/dit/latest`); `--model` draws from an
exported folder alone (no config, no run folder). Tags the vocabulary does not know are reported and
encoded as <unk> (as in training), never silently dropped.
"""

from __future__ import annotations

import argparse
import logging
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flows import outside_flow_runs
from tagdit.config import SamplerConfig
from tagdit.orchestrate.cli import arg_type, config_parser, parse_config
from tagdit.orchestrate.params import GuidanceScale, ImageCount, Steps
from tagdit.sampling.methods import SamplerName, sampler_method

log = logging.getLogger(__name__)


def _prompts(painter: Any, *texts: str) -> tuple[list[Any], list[str]]:
    """Token ids of each prompt, and every tag the vocabulary does not know (logged)."""
    ids, unknown = [], []
    for text in texts:
        x, bad = painter.parse(text)
        if bad:
            log.warning("tags not in the vocabulary (encoded as <unk>) in %r: %s", text, ", ".join(bad))
        ids.append(x)
        unknown += bad
    return ids, unknown


def _settings(negative: str, scale: float, sampler: SamplerConfig) -> str:
    eta = f", eta {sampler.eta}" if sampler.sampler == "ddim" else ""
    return (f" | negative: {negative}" if negative else "") + f" | cfg {scale}, {sampler.sampler} {sampler.steps} steps{eta}"


def model_name(checkpoint: Path) -> str:
    """How a PNG names the weights: `RUN/ckpt-0000900` for a run's checkpoint, `user/name` for a Hub
    snapshot, else the exported folder's name."""
    if checkpoint.name.startswith("ckpt-"):
        return f"{checkpoint.parent.parent.name}/{checkpoint.name}"
    hub = next((p.name for p in checkpoint.parents if p.name.startswith("models--")), None)
    return hub[len("models--"):].replace("--", "/") if hub else checkpoint.name


def _write(images: list[Any], seeds: list[int] | int, out: Path, caption: str,
           parameters: Callable[..., str]) -> list[str]:
    """The captioned row at `out`; with a list of seeds also one file per seed beside it,
    `<out>-seed<S>.png`. Each PNG carries its parameters: the row's in A1111's batch convention
    (`Seed` the first, image i drew seed + i), or, drawn from one generator, saying so."""
    from tagdit.formats.png_parameters import save_png
    from tagdit.sampling.grid import render_grid

    out.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(seeds, int):
        row = parameters(seeds, **{"Batch size": len(images), "Batch noise": "one generator"})
        save_png(render_grid([images], [caption], [f"#{i}" for i in range(len(images))]), out, row)
        return []
    save_png(render_grid([images], [caption], [f"seed {s}" for s in seeds]), out,
             parameters(seeds[0], **{"Batch size": len(images)}))
    files = [out.with_name(f"{out.stem}-seed{s}.png") for s in seeds]
    for image, seed, path in zip(images, seeds, files, strict=True):
        save_png(image, path, parameters(seed))
    return [str(f) for f in files]


def sample_images(
    painter: Any,
    prompt: str,
    negative: str = "",
    *,
    scale: float = 4.0,
    steps: int = 50,
    eta: float = 0.0,
    sampler: str = "ddim",
    seed: int = 0,
    n: int = 4,
    out: str | Path = "out.png",
    init_image: str | Path | None = None,
    strength: float = 0.6,
    shorten: bool = False,
    per_seed: bool = False,
) -> dict[str, Any]:
    """Generate `n` images for one prompt (from `init_image` when given), write them as one captioned row to `out`;
    with `per_seed`, image i has seed `seed + i` of its own and a file of its own too. Each PNG carries its
    parameters (A1111's `parameters` text: tagdit.formats.png_parameters)."""
    from tagdit.formats.png_parameters import infotext
    from tagdit.sampling.painter import read_image

    method = sampler_method(sampler, steps, eta, name="cli")
    image = read_image(Path(init_image).read_bytes()) if init_image else None
    (cond, neg), unknown = _prompts(painter, prompt, negative)
    seeds = [seed + i for i in range(n)] if per_seed else seed
    if image is None:
        images = painter.sample(cond, neg, method, scale, seeds, n)
    else:
        images = painter.img2img(image, cond, neg, method, scale, strength, seeds, n, shorten=shorten)
    caption = prompt + _settings(negative, scale, method) + ("" if per_seed else f", seed {seed}")
    extra = {}
    if image is not None:
        caption += f" | init {Path(init_image).name}, strength {strength}" + (" (shortened)" if shorten else "")
        extra = {"Denoising strength": f"{strength:g}"}

    def parameters(image_seed: int, **more: Any) -> str:
        return infotext(prompt, negative, method, scale, image_seed, images[0].size,
                        model_name(Path(painter.checkpoint)), **extra, **more)

    files = _write(images, seeds, Path(out), caption, parameters)
    log.info("wrote %s (%d images, checkpoint %s)", out, n, painter.checkpoint)
    return {"out": str(out), "checkpoint": str(painter.checkpoint), "unknown_tags": unknown,
            **({"files": files} if per_seed else {})}


def interpolate_images(
    painter: Any,
    prompt: str,
    negative: str = "",
    *,
    other_prompt: str | None = None,
    seeds: tuple[int, int] = (0, 0),
    frames: int = 8,
    scale: float = 4.0,
    steps: int = 50,
    sampler: str = "ddim",
    out: str | Path = "out.png",
    frame_ms: int = 150,
) -> dict[str, Any]:
    """Frames from (prompt, seeds[0]) to (other_prompt or prompt, seeds[1]): a strip PNG at `out`
    and the same frames as an animated GIF beside it (`out` with suffix .gif), looping back and forth."""
    from tagdit.sampling.grid import render_grid

    method = sampler_method(sampler, steps, name="cli")
    other = prompt if other_prompt is None else other_prompt
    (cond_a, cond_b, neg), unknown = _prompts(painter, prompt, other, negative)
    images = painter.interpolate(cond_a, cond_b, neg, method, scale, seeds, frames)
    ends = f"{prompt} (seed {seeds[0]}) -> {other} (seed {seeds[1]})"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_grid([images], [ends + _settings(negative, scale, method)], [f"{i}" for i in range(frames)]).save(out)
    anim = out.with_suffix(".gif")
    loop = images + images[-2:0:-1]  # there and back again
    loop[0].save(anim, save_all=True, append_images=loop[1:], duration=frame_ms, loop=0)
    log.info("wrote %s and %s (%d frames, checkpoint %s)", out, anim, frames, painter.checkpoint)
    return {"out": str(out), "animation": str(anim), "checkpoint": str(painter.checkpoint), "unknown_tags": unknown}


def add_model_options(p: argparse.ArgumentParser) -> None:
    """`--model DIR|USER/NAME` (an exported model instead of a run), `--revision`, `--subfolder` and
    `--device`; shared with flows.serve."""
    p.add_argument("--model", default=None, metavar="DIR|USER/NAME",
                   help="draw from this exported folder (tagdit export) or Hub model repository alone: "
                        "no --config/--set/--checkpoint")
    p.add_argument("--revision", default=None, help="with a Hub --model: its branch, tag or commit (default: main)")
    p.add_argument("--subfolder", default=None, help="with --model: the export's folder inside it")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                   help="where to draw (default: auto; for a run, evaluate.device)")


def painter_from_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> Any:
    """The painter the options name: the exported model `--model` (a folder or a Hub repo id, fetched
    with snapshot_download), or the config's run (`--checkpoint`)."""
    from tagdit.formats.exported_model import is_export, model_folder
    from tagdit.sampling.pretrained import painter_for_export
    from tasks.records import painter_for_run

    if a.model is None:
        if a.revision or a.subfolder:
            p.error("--revision and --subfolder apply to --model")
        a.overrides += [f"evaluate.device={a.device}"] if a.device else []
        return painter_for_run(parse_config(a), a.checkpoint)
    if a.config or a.overrides or a.checkpoint:
        p.error("--model draws from the exported folder alone: drop --config, --set and --checkpoint")
    try:
        folder = model_folder(a.model, subfolder=a.subfolder, revision=a.revision)
    except (FileNotFoundError, ValueError) as e:
        p.error(f"--model: {e}")
    if not is_export(folder):
        p.error(f"--model {folder} is not an exported tagdit model (no tagdit.json); write one with tagdit export")
    return painter_for_export(folder, a.device or "auto")


def _parser() -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = config_parser("Sample images for a tag prompt from the trained DiT.")
    p.add_argument("--prompt", required=True, help='comma-separated tags, e.g. "blue hair, smile"')
    p.add_argument("--negative", default="", help="negative prompt (replaces the null condition in CFG)")
    p.add_argument("--cfg-scale", "--cfg", dest="cfg", type=arg_type(GuidanceScale), default=4.0,
                   help="classifier-free guidance scale s (0-50; as evaluate's --cfg-scale)")
    p.add_argument("--sampling-steps", "--steps", dest="steps", type=arg_type(Steps), default=50,
                   help="sampler steps (at least 1; as evaluate's --sampling-steps)")
    p.add_argument("--eta", type=float, default=0.0, help="ddim only: 0 = DDIM, 1 = DDPM-like")
    p.add_argument("--sampler", default="ddim", choices=typing.get_args(SamplerName),
                   help="ddim; ddpm (DDIM with eta 1, the original's); dpmpp_2m (DPM-Solver++(2M), ~20 steps)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the noise for all n images (drawn from one generator; see --per-seed)")
    p.add_argument("--n", type=arg_type(ImageCount), default=4, help="number of images (1-64)")
    p.add_argument("--out", default="out.png", help="the PNG to write (one captioned row)")
    p.add_argument("--per-seed", action="store_true",
                   help="image i gets seed SEED+i of its own and a file of its own too, OUT-seed<S>.png")
    p.add_argument("--checkpoint", default=None, help="checkpoint or run dir (default: <run>/dit latest EMA)")
    add_model_options(p)
    p.add_argument("--init-image", default=None, help="img2img: start from this image's centre crop")
    p.add_argument("--strength", type=float, default=0.6, help="img2img: 0 keeps the image, 1 ignores it")
    p.add_argument("--shorten", action="store_true",
                   help="img2img: run ceil(strength x steps) steps (diffusers) instead of all steps over the "
                        "noised range (the original)")
    p.add_argument("--interpolate-seeds", type=int, nargs=2, metavar=("A", "B"), default=None,
                   help="interpolate: slerp the starting noise from seed A to seed B")
    p.add_argument("--interpolate-prompt", default=None, metavar="TAGS",
                   help="interpolate: blend the tag embeddings from --prompt to these tags")
    p.add_argument("--frames", type=int, default=8, help="interpolate: number of frames, ends included")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    outside_flow_runs()
    p = _parser()
    a = p.parse_args(argv)
    interpolating = a.interpolate_seeds is not None or a.interpolate_prompt is not None
    if interpolating and a.init_image:
        p.error("--init-image cannot be combined with --interpolate-seeds/--interpolate-prompt")
    if a.sampler != "ddim" and a.eta != 0:
        p.error(f"--eta applies to the ddim sampler only; {a.sampler} fixes its own")
    if interpolating and (a.eta != 0 or a.sampler == "ddpm"):
        p.error("interpolation needs a deterministic sampler: ddim with --eta 0, or dpmpp_2m")
    if a.init_image and not 0 <= a.strength <= 1:
        p.error(f"--strength must be in [0, 1], got {a.strength}")
    if a.frames < 2:
        p.error(f"--frames must be at least 2, got {a.frames}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    painter = painter_from_args(p, a)
    if interpolating:
        seeds = tuple(a.interpolate_seeds or (a.seed, a.seed))
        return interpolate_images(painter, a.prompt, a.negative, other_prompt=a.interpolate_prompt, seeds=seeds,
                                  frames=a.frames, scale=a.cfg, steps=a.steps, sampler=a.sampler, out=a.out)
    return sample_images(painter, a.prompt, a.negative, scale=a.cfg, steps=a.steps, eta=a.eta, sampler=a.sampler,
                         seed=a.seed, n=a.n, out=a.out, init_image=a.init_image, strength=a.strength,
                         shorten=a.shorten, per_seed=a.per_seed)


if __name__ == "__main__":
    main()
