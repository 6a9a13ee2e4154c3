"""Generation parameters in a PNG's `parameters` text chunk, in AUTOMATIC1111's web UI format.

Image viewers and tools that read Stable Diffusion images (A1111's PNG Info, ComfyUI, Civitai,
exiftool) show this text:

    blue hair, smile
    Negative prompt: hat
    Steps: 20, Sampler: DDIM, CFG scale: 4, Seed: 0, Size: 64x64, Model: demo

The one writer and reader of it: `tagdit sample` writes, tests and users read.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, PngImagePlugin

from tagdit.config import SamplerConfig

SAMPLER_NAMES = {"ddim": "DDIM", "dpmpp_2m": "DPM++ 2M"}  # A1111's names of our samplers


def infotext(prompt: str, negative: str, sampler: SamplerConfig, cfg_scale: float, seed: int,
             size: tuple[int, int], model: str, **extra: object) -> str:
    """The text: the prompt, `Negative prompt: ...` when there is one, then `Key: value` settings."""
    settings: dict[str, object] = {"Steps": sampler.steps, "Sampler": SAMPLER_NAMES[sampler.sampler],
                                   "CFG scale": f"{cfg_scale:g}", "Seed": seed, "Size": f"{size[0]}x{size[1]}",
                                   "Model": model}
    if sampler.sampler == "ddim" and sampler.eta:
        settings["Eta DDIM"] = f"{sampler.eta:g}"
    settings.update(extra)
    lines = [prompt, *([f"Negative prompt: {negative}"] if negative else [])]
    return "\n".join([*lines, ", ".join(f"{k}: {v}" for k, v in settings.items())])


def save_png(image: Image.Image, path: str | Path, parameters: str) -> None:
    """Write `image` as a PNG carrying `parameters` (a tEXt/iTXt chunk named `parameters`)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    image.save(path, format="PNG", pnginfo=info)


def read_parameters(path: str | Path) -> dict[str, str]:
    """The chunk parsed back: `prompt`, `negative` (maybe empty) and each setting by its A1111 name."""
    with Image.open(path) as im:
        text = im.text.get("parameters", "")  # type: ignore[attr-defined]
    *head, last = text.split("\n")
    negative = next((line[len("Negative prompt: "):] for line in head if line.startswith("Negative prompt: ")), "")
    prompt = "\n".join(line for line in head if not line.startswith("Negative prompt: "))
    settings = dict(item.split(": ", 1) for item in last.split(", ") if ": " in item)
    return {"prompt": prompt, "negative": negative, **settings}
