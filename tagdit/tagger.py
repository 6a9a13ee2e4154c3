"""The WD 1.4 tagger through ONNX Runtime: model loading, reference preprocessing, tag selection.

Copies the interface and recipe of SmilingWolf's wd-v1-4 taggers (DESIGN §6): NHWC float32 BGR
0-255 input, sigmoid outputs, `selected_tags.csv` with rating (9), general (0) and character (4)
rows. Used by the tag stage, the evaluation stage (tagging generated images) and the demo tagger.
"""

from __future__ import annotations

import csv
import logging
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from tagdit.config import TaggerConfig

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
RATING, GENERAL, CHARACTER = 9, 0, 4
# Tag names kept verbatim (the reference keeps their underscores).
KAOMOJIS = frozenset(
    "0_0 (o)_(o) +_+ +_- ._. <o>_<o> <|>_<|> =_= >_< 3_3 6_9 >_o @_@ ^_^ o_o u_u x_x |_| ||_||".split()
)


BATCH_END = object()  # put between images to end a batch early (see WDTagger.probabilities)


class TaggerNotFoundError(FileNotFoundError):
    """The tagger model is neither in a local folder nor downloadable / in the HF cache."""


class TagResult(NamedTuple):
    """Selected tags in score order, their scores, and the rating label."""

    tags: list[str]
    scores: list[float]
    rating: str


def display_name(raw: str) -> str:
    """`long_hair` -> `long hair`; kaomoji such as `^_^` stay as they are."""
    raw = raw.strip()
    return raw if raw in KAOMOJIS else raw.replace("_", " ")


@dataclass(frozen=True)
class TagLabels:
    """The rows of `selected_tags.csv`: display names and categories, in model output order."""

    names: list[str]
    categories: np.ndarray  # (T,) int

    @classmethod
    def from_csv(cls, path: str | Path) -> TagLabels:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"name", "category"} <= set(rows[0]):
            raise ValueError(f"{path}: expected a CSV with header tag_id,name,category,count")
        return cls([display_name(r["name"]) for r in rows], np.array([int(r["category"]) for r in rows]))

    def indexes(self, category: int) -> np.ndarray:
        return np.flatnonzero(self.categories == category)

    def category_of(self) -> dict[str, int]:
        return {n: int(c) for n, c in zip(self.names, self.categories, strict=True)}


def mcut_threshold(probs: np.ndarray) -> float:
    """Maximum Cut Thresholding (Largeron et al. 2012): the midpoint of the largest gap."""
    if len(probs) < 2:
        return 0.0
    s = np.sort(probs)[::-1]
    gaps = s[:-1] - s[1:]
    t = int(gaps.argmax())
    return float((s[t] + s[t + 1]) / 2)


def select_tags(
    probs: np.ndarray,
    labels: TagLabels,
    general_threshold: float = 0.35,
    character_threshold: float = 0.85,
    mcut: bool = False,
    exclude: Iterable[str] = (),
) -> TagResult:
    """Threshold one image's probabilities (T,) into (tags, scores, rating), tags in score order."""
    probs = np.asarray(probs, dtype=np.float32).reshape(-1)
    if probs.shape[0] != len(labels.names):
        raise ValueError(f"got {probs.shape[0]} scores for {len(labels.names)} tags")
    excluded = {display_name(t) for t in exclude}
    gen, char, rat = (labels.indexes(c) for c in (GENERAL, CHARACTER, RATING))
    g_thr, c_thr = general_threshold, character_threshold
    if mcut:
        g_thr = mcut_threshold(probs[gen])
        c_thr = max(0.15, mcut_threshold(probs[char]))
    keep = np.concatenate([gen[probs[gen] > g_thr], char[probs[char] > c_thr]])
    keep = keep[np.argsort(-probs[keep], kind="stable")]
    keep = [i for i in keep if labels.names[i] not in excluded]
    rating = labels.names[rat[int(probs[rat].argmax())]] if len(rat) else ""
    return TagResult([labels.names[i] for i in keep], [float(probs[i]) for i in keep], rating)


def to_rgba(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGBA (16-bit and float greyscale scaled to 8 bits, CMYK via RGB)."""
    if img.mode == "RGBA":
        return img
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        a = a / 257.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else a
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    return img.convert("RGBA")


def to_rgb_on_white(img: Image.Image) -> Image.Image:
    """Composite any image (alpha, palette transparency) on white and return RGB."""
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    if not has_alpha:
        return img if img.mode == "RGB" else to_rgba(img).convert("RGB")
    canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
    canvas.alpha_composite(to_rgba(img))
    return canvas.convert("RGB")


def wd_square(img: Image.Image, size: int) -> Image.Image:
    """The reference WD recipe up to the resize: on white -> centred white square -> BICUBIC to size."""
    img = to_rgb_on_white(img)
    w, h = img.size
    side = max(w, h)
    if w != h:
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        img = square
    return img.resize((size, size), Image.BICUBIC) if side != size else img


def wd_preprocess(img: Image.Image, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Reference WD input: (size, size, 3) float32 BGR 0-255, written into `out` when given."""
    rgb = np.asarray(wd_square(img, size))  # (S, S, 3) uint8
    if out is None:
        out = np.empty((size, size, 3), np.float32)
    for c in range(3):  # RGB -> BGR and uint8 -> float32; per channel is 5x faster than a reversed view
        out[:, :, c] = rgb[:, :, 2 - c]
    return out


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def resolve_files(repo: str, path: str | Path | None = None) -> tuple[Path, Path]:
    """(model.onnx, selected_tags.csv) from a local folder, else the HF cache / Hub."""
    if path is not None:
        folder = Path(path)
        files = folder / MODEL_FILE, folder / TAGS_FILE
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise TaggerNotFoundError(f"tagger.path={str(folder)!r} lacks {', '.join(missing)}")
        return files
    from huggingface_hub import constants, hf_hub_download

    try:
        return tuple(Path(hf_hub_download(repo, f)) for f in (MODEL_FILE, TAGS_FILE))  # type: ignore[return-value]
    except Exception as e:  # offline, no cache, no network, gated repo ...
        offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "download failed"
        raise TaggerNotFoundError(
            f"WD tagger {repo!r} ({MODEL_FILE}, {TAGS_FILE}) is not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE!r} and {offline} ({type(e).__name__}: {e}). Download it "
            f"there, or set tagger.path to a folder holding {MODEL_FILE} and {TAGS_FILE} "
            f"(e.g. --set tagger.path=shards/demo-tagger)."
        ) from e


class WDTagger:
    """A WD 1.4 ONNX tagger: `tag_images(pil_images)` -> TagResult per image."""

    def __init__(
        self,
        model_path: str | Path,
        tags_csv: str | Path,
        general_threshold: float = 0.35,
        character_threshold: float = 0.85,
        mcut: bool = False,
        exclude: Sequence[str] = (),
        batch_size: int = 16,
        providers: Sequence[str] | None = None,
        threads: int = 0,
    ):
        import onnxruntime as ort

        self.model_path, self.tags_csv = Path(model_path), Path(tags_csv)
        self.labels = TagLabels.from_csv(tags_csv)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0 = onnxruntime's default (all cores)
        opts.log_severity_level = 3
        # no busy-waiting between runs: the preprocessing thread needs those cycles (DESIGN §6)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(model_path), opts, providers=list(providers or default_providers()))
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        n, h, w, c = inp.shape  # NHWC; the batch dim is an int when fixed, a str/None when dynamic
        if not (isinstance(h, int) and h == w and c == 3):
            raise ValueError(f"{model_path}: expected NHWC [N, S, S, 3] input, got {inp.shape}")
        self.size = h
        self.fixed_batch = n if isinstance(n, int) and n > 0 else None
        self.batch_size = self.fixed_batch or batch_size
        self.general_threshold, self.character_threshold = general_threshold, character_threshold
        self.mcut, self.exclude = mcut, tuple(exclude)
        log.info("tagger %s: input %s %s, batch %s, providers %s", model_path, self.input_name,
                 inp.shape, self.fixed_batch or f"dynamic (using {batch_size})", self.session.get_providers())

    @classmethod
    def from_dir(cls, path: str | Path, **kw: Any) -> WDTagger:
        return cls(*resolve_files("", path), **kw)

    @classmethod
    def from_config(cls, tcfg: TaggerConfig, **kw: Any) -> WDTagger:
        model, tags = resolve_files(tcfg.repo, tcfg.path)
        return cls(model, tags, tcfg.general_threshold, tcfg.character_threshold, tcfg.mcut,
                   tcfg.exclude, tcfg.batch_size, **kw)

    @property
    def names(self) -> list[str]:
        return self.labels.names

    def preprocess(self, img: Image.Image) -> np.ndarray:
        """PIL image -> (S, S, 3) float32 BGR 0-255, the reference recipe."""
        return wd_preprocess(img, self.size)

    def preprocess_into(self, img: Image.Image, out: np.ndarray) -> np.ndarray:
        """`preprocess` writing into a preallocated (S, S, 3) float32 slot."""
        return wd_preprocess(img, self.size, out)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) preprocessed -> (N, T) probabilities; splits N for fixed-batch models."""
        step = self.fixed_batch or len(batch) or 1
        outs = [self.session.run([self.output_name], {self.input_name: batch[i : i + step]})[0]
                for i in range(0, len(batch), step)]
        return np.concatenate(outs) if outs else np.zeros((0, len(self.names)), np.float32)

    def select_tags(self, probs: np.ndarray) -> TagResult:
        return select_tags(probs, self.labels, self.general_threshold, self.character_threshold,
                           self.mcut, self.exclude)

    def probabilities(self, images: Iterable[Image.Image | object]) -> Iterator[np.ndarray]:
        """(T,) probabilities per image, preprocessing the next batch while this one runs.

        A `BATCH_END` item closes the current batch early: results can differ in the last float
        bits with batch composition, so callers that need reproducible bytes pin batches to units.
        """
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def produce() -> None:
            try:
                shape = (self.batch_size, self.size, self.size, 3)
                batch, n = np.empty(shape, np.float32), 0  # (B, S, S, 3)
                for img in images:
                    if img is not BATCH_END:
                        self.preprocess_into(img, batch[n])
                        n += 1
                    if n and (n == self.batch_size or img is BATCH_END):
                        q.put(batch[:n])
                        batch, n = np.empty(shape, np.float32), 0
                        if stop.is_set():
                            return
                if n:
                    q.put(batch[:n])
                q.put(None)
            except BaseException as e:  # re-raised in the consumer
                q.put(e)

        worker = threading.Thread(target=produce, name="wd-preprocess", daemon=True)
        worker.start()
        try:
            while (item := q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield from self.predict(item)
        finally:
            stop.set()
            while worker.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass

    def tag_images(self, images: Iterable[Image.Image | object]) -> Iterator[TagResult]:
        """TagResult per image, in input order."""
        for p in self.probabilities(images):
            yield self.select_tags(p)

    def fingerprint(self) -> dict[str, str]:
        """sha256 of the model files (for cache keys)."""
        from tagdit.stage import file_fingerprint

        return {"model": file_fingerprint(self.model_path), "tags": file_fingerprint(self.tags_csv)}


def tagger_fingerprint(tcfg: TaggerConfig) -> dict[str, str]:
    """sha256 of the configured tagger's files, without building a session."""
    from tagdit.stage import file_fingerprint

    model, tags = resolve_files(tcfg.repo, tcfg.path)
    return {"model": file_fingerprint(model), "tags": file_fingerprint(tags)}
