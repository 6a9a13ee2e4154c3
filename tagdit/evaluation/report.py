"""What an evaluation shows people: the Prefect markdown artifact and TensorBoard scalars (the trend table: trend.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tagdit.config import PipelineConfig
from tagdit.formats.eval_metrics import EvalMetrics, KidScore


def log_to_tensorboard(cfg: PipelineConfig, m: EvalMetrics) -> None:
    """Grids and headline metrics at the checkpoint's step, under `<run>/eval/tb`."""
    from torch.utils.tensorboard import SummaryWriter

    step = m.dit_step or 0
    with SummaryWriter(str(cfg.run_dir / "eval" / "tb")) as writer:
        for name, path in m.grids.items():
            writer.add_image(f"grid/{name}", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
        writer.add_scalar("eval/tag_recall_ratio", m.tag_recall_ratio, step)
        if m.tag_recall_ratio_se is not None:
            writer.add_scalar("eval/tag_recall_ratio_se", m.tag_recall_ratio_se, step)
        for name, r in m.sampler_recall.items():
            writer.add_scalar(f"eval/recall_cfg_{name}", r.recall, step)
        for kind, values in (("kid_tagger", m.kid_tagger), ("kid_inception", m.kid_inception or {})):
            for name, value in values.items():
                if value is not None:
                    writer.add_scalar(f"eval/{kind}_{name}", value, step)
        for name, k in m.kid.items():
            if k.mean is not None:
                writer.add_scalar(f"eval/kid_{name}", k.mean, step)


def _kids(m: EvalMetrics) -> dict[str, dict[str, float | None]]:
    """The tagger-feature KIDs (and an old file's kid_inception), by name."""
    return {"kid_tagger": m.kid_tagger, **({"kid_inception": m.kid_inception} if m.kid_inception is not None else {})}


def _num(x: float | None, places: int) -> str:
    """A metric as people read it: `places` decimals, or "not computed"."""
    return "not computed" if x is None else f"{x:.{places}f}"


def ratio_text(m: EvalMetrics) -> str:
    """`ratio ± se` (the se when the evaluation has one)."""
    return f"{m.tag_recall_ratio:.3f}" + ("" if m.tag_recall_ratio_se is None else f" ± {m.tag_recall_ratio_se:.3f}")


def kid_line(k: KidScore) -> str:
    """One Inception KID with everything needed to compare it."""
    if k.mean is None:
        return f"- KID {k.variant}: not computed ({k.note})"
    return (f"- KID {k.variant}: **{k.mean:.5f} ± {k.std:.5f}** (std over {k.subsets} subsets of {k.subset_size}; "
            f"{k.extractor}, {k.weights}, {k.input_size} px; {k.generated} generated ({k.sampler}, CFG {k.cfg_scale}) "
            f"vs {k.real} validation images)")


def artifact_markdown(metrics_path: str | Path) -> str:
    """A small embedded grid, the metrics table and links to the full-size files of one evaluation's metrics.json."""
    from tagdit.sampling.grid import image_data_uri

    m = EvalMetrics.read(metrics_path)
    lines = [
        f"# tagdit evaluation — {m.dit_checkpoint}",
        f"![grid]({image_data_uri(Image.open(next(iter(m.grids.values()))))})",
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
    kids = " · ".join(f"{kind} (CFG): {_num(values.get('cfg'), 5)}" for kind, values in _kids(m).items())
    se = "" if m.tag_recall_ratio_se is None else f" (± standard error over {m.samples_per_prompt} samples per prompt)"
    lines += ["", f"**tag_recall_ratio** (CFG / real): {ratio_text(m)}{se} · VAE PSNR: "
              f"{m.vae_psnr_db:.2f} dB · DiT val loss: {_num(m.dit_val_loss, 4)} · {kids}", ""]
    lines += [kid_line(k) for k in m.kid.values()]
    lines += ["", "Full-size files (on the machine that ran the evaluation):"]
    lines += [f"- {name}: `{Path(p).resolve()}`" for name, p in m.grids.items()]
    lines.append(f"- metrics: `{Path(metrics_path).resolve()}`")
    return "\n".join(lines)
