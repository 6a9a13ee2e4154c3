"""The typed parameters of every flow: what Prefect's run form shows, and what it refuses.

A flow's signature uses these types and describes each parameter in its docstring's `Args:`;
Prefect turns both into the deployment's parameter schema, and the server checks a new run's
parameters against it when the run is created (`enforce_parameter_schema`, on by default), so
`force=["trian_dit"]` or `dit_steps=0` fails at `prefect deployment run`, before a worker starts.
The same types build the command line (`tagdit.orchestrate.cli`).

The typed settings (`source`, `run`, `dit_steps`, ...) are the settings people change most; each
becomes a `key=value` override applied after `overrides`, the escape hatch for every other key.
"""

from __future__ import annotations

import functools
import json
import typing
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, WithJsonSchema
from pydantic.json_schema import SkipJsonSchema

from tagdit.config import PipelineConfig, load_config
from tagdit.orchestrate.override_schema import override_json_schema
from tagdit.sampling.methods import SamplerName, sampler_method, sampler_name

# `X | Unset = None`: optional, None when not given, but the schema offers X alone, so Prefect's form shows
# an X input (empty: not sent) instead of "Property is type None"; an explicit null is refused.
Unset = SkipJsonSchema[None]
Preset = Literal["demo", "original-256"]  # configs/<name>.yaml (a test keeps this list in step)
YamlFile = Annotated[str, StringConstraints(pattern=r"\.ya?ml$")]
ConfigRef = Preset | YamlFile
Override = Annotated[str, StringConstraints(pattern=r"^\s*[A-Za-z_][\w.]*\s*="),
                     WithJsonSchema(override_json_schema(PipelineConfig))]  # keys checked by the server
FolderName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][\w.-]*$", max_length=100)]
Steps = Annotated[int, Field(ge=1)]
Gpus = Annotated[int, Field(ge=1, le=64)]
ImageCount = Annotated[int, Field(ge=1, le=64)]  # images drawn by one `tagdit sample`
GuidanceScale = Annotated[float, Field(ge=0, le=50)]
HubRepo = Annotated[str, StringConstraints(pattern=r"^[\w.-]+/[\w.-]+$")]  # a Hugging Face repo id, user/name
GitRevision = Annotated[str, StringConstraints(pattern=r"^[\w.][\w./-]*$", max_length=200)]  # a branch, tag or commit of a Hub repo
SamplerChoice = SamplerName  # ddim, ddpm (DDIM with eta 1, the original's DDPM sampler), dpmpp_2m

# One name per stage everywhere: --force, flows, deployments, stamps (`.stage-<name>.json`), logs.
PipelineStage = Literal["demo-world", "crop", "tag", "shard", "train-vae", "encode", "train-dit", "evaluate"]
OLD_STAGE_NAMES = {"demo": "demo-world", "train_vae": "train-vae", "train_dit": "train-dit", "demo_world": "demo-world"}


def stage_spelling(name: str) -> str:
    """The stage's name for an earlier spelling of it (`train_dit` -> `train-dit`), else `name` itself."""
    return OLD_STAGE_NAMES.get(name, name)

PrepareStage = Literal["crop", "tag", "shard"]


def _only(stage: str) -> Any:
    """A one-stage choice, in the schema as an enum (not a const) so that a refusal names the wrong value."""
    return Annotated[Literal[stage], WithJsonSchema({"type": "string", "enum": [stage]})]


DemoStage = _only("demo-world")
TrainVaeStage = _only("train-vae")
EncodeStage = _only("encode")
TrainDitStage = _only("train-dit")
EvaluateStage = _only("evaluate")

# typed setting -> the config keys it sets
SETTING_KEYS: dict[str, tuple[str, ...]] = {
    "source": ("data.source",),
    "dataset": ("data.name",),
    "run": ("run.name",),
    "vae_steps": ("vae.train.steps",),
    "dit_steps": ("dit.train.steps",),
    "gpus": ("vae.train.nproc", "dit.train.nproc"),
    "cfg_scale": ("evaluate.cfg_scale",),
}
SAMPLER_SETTINGS = ("sampler", "sampling_steps")


def _sampler_override(cfg: PipelineConfig, sampler: str | None, steps: int | None) -> str:
    """One evaluation sampler in place of the preset's list, from the first one's settings."""
    first = cfg.evaluate.samplers[0]
    kind = sampler or sampler_name(first)
    eta = first.eta if kind == "ddim" == sampler_name(first) else None
    spec = sampler_method(kind, steps or first.steps, eta)
    return "evaluate.samplers=" + json.dumps([spec.model_dump(mode="json", exclude={"recall"})])


def typed_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The typed settings among a flow run's parameters (those set, not None)."""
    known = set(SETTING_KEYS) | set(SAMPLER_SETTINGS)
    return {k: v for k, v in params.items() if k in known and v is not None}


def flow_config(config: str | None, overrides: list[str] | None, **settings: Any) -> PipelineConfig:
    """The run's config: the preset, then `overrides`, then the typed settings given (not None)."""
    settings = typed_settings(settings)
    extra = [f"{key}={json.dumps(value) if isinstance(value, str) else value}"
             for name, value in settings.items() if name in SETTING_KEYS for key in SETTING_KEYS[name]]
    items = [*(overrides or []), *extra]
    if any(name in settings for name in SAMPLER_SETTINGS):
        base = load_config(config, items)
        items.append(_sampler_override(base, settings.get("sampler"), settings.get("sampling_steps")))
    return load_config(config, items)


COMMON_ARGS = """\
config: a preset (demo, original-256) or a YAML file; empty: the built-in defaults.
overrides: further settings as key=value (e.g. vae.train.lr=2e-4); the fields below win over them.
force: stages to recompute, with every stage after them, ignoring their caches.
"""


def preset_settings(cfg: PipelineConfig) -> dict[str, str]:
    """What each typed setting is when left empty, under this config (`dit_steps` -> "900")."""
    first = cfg.evaluate.samplers[0]
    return {"source": str(cfg.data.source), "dataset": cfg.data.name, "run": cfg.run.name,
            "vae_steps": str(cfg.vae.train.steps), "dit_steps": str(cfg.dit.train.steps),
            "gpus": str(cfg.dit.train.nproc), "cfg_scale": str(cfg.evaluate.cfg_scale),
            "sampler": ", ".join(s.name for s in cfg.evaluate.samplers), "sampling_steps": str(first.steps)}


@functools.cache
def preset_defaults() -> dict[str, str]:
    """Per typed setting, its value under each preset, as the run form says it: "demo: 900; original-256: 500000"."""
    values = {name: preset_settings(load_config(name)) for name in typing.get_args(Preset)}
    return {key: "; ".join(f"{name}: {v[key]}" for name, v in values.items()) for key in next(iter(values.values()))}


def _with_preset_values(lines: list[str]) -> list[str]:
    """`dit_steps: DiT optimizer steps (dit.train.steps).` + ` Default: the preset's (demo: 900; original-256: ...).`"""
    defaults = preset_defaults()
    out = []
    for line in lines:
        name = line.strip().split(":", 1)[0]
        out.append(f"{line.rstrip()} Default: the preset's ({defaults[name]})." if name in defaults else line)
    return out


def with_common_args(fn: Any) -> Any:
    """Put the `config`/`overrides`/`force` descriptions at the top of `fn`'s `Args:` docstring section,
    and end each typed setting's with its value under each preset (what an empty field runs with).

    Apply under `@flow`: Prefect reads the descriptions when the flow is decorated.
    """
    doc = fn.__doc__ or ""
    if "Args:\n" not in doc:
        doc = doc.rstrip() + "\n\n    Args:\n        \n"
    head, sep, tail = doc.partition("Args:\n")
    indent = tail[: len(tail) - len(tail.lstrip(" "))]
    tail = "\n".join(_with_preset_values(tail.split("\n")))
    fn.__doc__ = head + sep + "".join(indent + line + "\n" for line in COMMON_ARGS.splitlines()) + tail
    return fn
