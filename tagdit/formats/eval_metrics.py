"""`metrics.json`: what one evaluation of one DiT checkpoint measured (the evaluate stage writes it).

The one writer and reader of the file: the evaluate stage, its artifacts, the flows and the
benchmarks all go through `EvalMetrics`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from tagdit.files import write_json_atomic


class Fidelity(BaseModel):
    """Mean recall and precision of the wanted tags among the tagger's tags, over `n` images."""

    recall: float
    precision: float
    n: int


class SamplerFidelity(Fidelity):
    """Fidelity of one sampler's CFG samples (same prompts and seeds as the first sampler's)."""

    sampler: str
    steps: int


class PromptFidelity(BaseModel):
    prompt: str
    cfg: Fidelity
    unconditional: Fidelity


class EvalMetrics(BaseModel):
    """Tag fidelity, KID, VAE round trip and provenance of one evaluation."""

    model_config = ConfigDict(extra="forbid")

    dit_checkpoint: str
    dit_step: int | None = None
    sampler: str  # the sampler of the headline CFG samples (evaluate.samplers[0])
    cfg_scale: float
    samples_per_prompt: int = 0
    cfg: Fidelity  # CFG samples
    unconditional: Fidelity  # unconditional samples: the floor
    real: Fidelity  # real validation images: the ceiling
    reconstructed: Fidelity  # their VAE reconstructions: the VAE's ceiling
    tag_recall_ratio: float  # cfg.recall / real.recall
    per_prompt: list[PromptFidelity] = []
    sampler_recall: dict[str, SamplerFidelity] = {}
    kid_tagger: dict[str, float | None]  # "cfg" / "unconditional" -> KID over the tagger's scores
    kid_inception: dict[str, float | None] | None = None  # over Inception-v3 pool features, when weights exist
    vae_psnr_db: float
    dit_val_loss: float | None = None
    prompts: list[str] = []
    negative_example: dict[str, str] = {}
    grids: dict[str, str]  # sampler name -> grid PNG
    tagger_repo: str | None = None
    tagger_revision: str | None = None
    tagger_commit: str | None = None

    def write(self, path: str | Path) -> None:
        write_json_atomic(Path(path), self.model_dump(mode="json", exclude_none=False))

    @classmethod
    def read(cls, path: str | Path) -> EvalMetrics:
        return cls.model_validate_json(Path(path).read_text())
