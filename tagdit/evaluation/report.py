"""What an evaluation shows people: the Prefect markdown artifact, the metrics table, TensorBoard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tagdit.config import PipelineConfig
from tagdit.formats.eval_metrics import EvalMetrics
from tagdit.orchestrate.stage import StageRecord


def log_to_tensorboard(cfg: PipelineConfig, m: EvalMetrics) -> None:
    """Grids and headline metrics at the checkpoint's step, under `<run>/eval/tb`."""
    from torch.utils.tensorboard import SummaryWriter

    step = m.dit_step or 0
    with SummaryWriter(str(cfg.run_dir / "eval" / "tb")) as writer:
        for name, path in m.grids.items():
            writer.add_image(f"grid/{name}", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        writer.add_scalar("eval/tag_recall_ratio", m.tag_recall_ratio, step)
        for name, r in m.sampler_recall.items():
            writer.add_scalar(f"eval/recall_cfg_{name}", r.recall, step)
        for kind, values in (("kid_tagger", m.kid_tagger), ("kid_inception", m.kid_inception or {})):
            for name, value in values.items():
                if value is not None:
                    writer.add_scalar(f"eval/{kind}_{name}", value, step)


def _kids(m: EvalMetrics) -> dict[str, dict[str, float | None]]:
    """The KID variants this evaluation has, by name."""
    return {"kid_tagger": m.kid_tagger, **({"kid_inception": m.kid_inception} if m.kid_inception is not None else {})}


def artifact_markdown(record: StageRecord) -> str:
    """A small embedded grid, the metrics table and links to the full-size files."""
    from tagdit.sampling.grid import png_data_uri

    m = EvalMetrics.read(record.info["metrics"])
    lines = [
        f"# tagdit evaluation — {m.dit_checkpoint}",
        f"![grid]({png_data_uri(Image.open(next(iter(m.grids.values()))))})",
        "",
        "| images | tag recall | tag precision |",
        "|---|---|---|",
    ]
    for k, label in (("cfg", f"CFG {m.cfg_scale} samples ({m.sampler})"), ("unconditional", "unconditional samples (floor)"),
                     ("real", "real validation images (ceiling)"),
                     ("reconstructed", "their VAE reconstructions (the VAE's ceiling)")):
        f = getattr(m, k)
        lines.append(f"| {label} | {f.recall:.3f} | {f.precision:.3f} |")
    for name, r in list(m.sampler_recall.items())[1:]:
        lines.append(f"| CFG {m.cfg_scale} samples ({name}: {r.sampler}, {r.steps} steps) "
                     f"| {r.recall:.3f} | {r.precision:.3f} |")
    kids = " · ".join(f"{kind} (CFG): {values.get('cfg')}" for kind, values in _kids(m).items())
    lines += ["", f"**tag_recall_ratio** (CFG / real): {m.tag_recall_ratio:.3f} · VAE PSNR: "
              f"{m.vae_psnr_db:.2f} dB · DiT val loss: {m.dit_val_loss} · {kids}",
              "", "Full-size files (on the machine that ran the evaluation):"]
    lines += [f"- {name}: `{Path(p).resolve()}`" for name, p in m.grids.items()]
    lines.append(f"- metrics: `{Path(record.info['metrics']).resolve()}`")
    return "\n".join(lines)


def metrics_table(record: StageRecord) -> list[dict[str, Any]]:
    """The headline metrics as table rows (a Prefect table artifact with a stable key per run)."""
    m = EvalMetrics.read(record.info["metrics"])
    rows = [{"metric": "dit_checkpoint", "value": m.dit_checkpoint},
            {"metric": "tag_recall_ratio", "value": round(m.tag_recall_ratio, 4)}]
    rows += [{"metric": f"recall_{k}", "value": round(getattr(m, k).recall, 4)}
             for k in ("cfg", "unconditional", "real", "reconstructed")]
    rows += [{"metric": f"recall_cfg_{name}", "value": round(r.recall, 4)} for name, r in m.sampler_recall.items()]
    rows += [{"metric": f"{kind}_{k}", "value": None if v is None else round(v, 5)}
             for kind, values in _kids(m).items() for k, v in values.items()]
    rows += [{"metric": "vae_psnr_db", "value": round(m.vae_psnr_db, 3)},
             {"metric": "dit_val_loss", "value": m.dit_val_loss}]
    return rows
