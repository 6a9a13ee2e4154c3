"""The WD 1.4 tagger: finding its files, reference preprocessing, batched runs, tag selection.

Copies the interface and recipe of SmilingWolf's wd-v1-4 taggers (docs/design.md §6): NHWC float32
BGR 0-255 input (`tagdit.formats.wd_image`), sigmoid outputs, labels from `selected_tags.csv`
(`tagdit.formats.selected_tags`). Used by the tag stage, the evaluation stage (tagging generated
images) and the demo tagger.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image
from pydantic import BaseModel

from tagdit.data.onnx_session import import_onnxruntime, open_session
from tagdit.data.prefetch import prefetch
from tagdit.formats.selected_tags import CHARACTER, GENERAL, RATING, TagLabels, display_name
from tagdit.formats.wd_image import WD_RESIZE

if TYPE_CHECKING:
    from tagdit.config import TaggerConfig

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"

BATCH_END = object()  # put between images to end a batch early (see WDTagger.probabilities)


class TaggerNotFoundError(FileNotFoundError):
    """The tagger's files are neither in a local folder nor downloadable / in the HF cache."""


class TagResult(NamedTuple):
    """Selected tags in score order, their scores, and the rating label."""

    tags: list[str]
    scores: list[float]
    rating: str


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


def _local_files(folder: str | Path) -> tuple[Path, Path]:
    """(model.onnx, selected_tags.csv) in a local folder, or a TaggerNotFoundError naming what lacks."""
    folder = Path(folder)
    files = folder / MODEL_FILE, folder / TAGS_FILE
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise TaggerNotFoundError(f"tagger.path={str(folder)!r} lacks {', '.join(missing)}")
    return files


def _hub_error(repo: str, revision: str, filename: str, cache_dir: str, e: Exception) -> TaggerNotFoundError:
    """The error for a Hub file that can be neither downloaded nor found in the cache."""
    from huggingface_hub import constants
    from huggingface_hub.utils import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, RevisionNotFoundError):
        why = f"the repo has no revision {revision!r}"
    elif isinstance(e, RepositoryNotFoundError):
        why = "the repo does not exist, or is gated or private and needs a token"
    elif isinstance(e, LocalEntryNotFoundError):  # before EntryNotFound, its parent class
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub is unreachable"
        why += " and the file is not in the cache"
    elif isinstance(e, EntryNotFoundError):
        why = f"the repo has no {filename} at that revision"
    else:
        why = "the download failed"
    return TaggerNotFoundError(
        f"WD tagger file {filename!r} of {repo!r} at revision {revision!r} is unavailable: {why} "
        f"({type(e).__name__}: {e}). Hugging Face cache folder: {cache_dir!r}. Fix: run once online "
        f"(HF_HUB_OFFLINE unset) to fill the cache, or set tagger.path to a folder holding {MODEL_FILE} "
        f"and {TAGS_FILE} (e.g. --set tagger.path=shards/demo-tagger)."
    )


_RESOLVE_LOCK = threading.Lock()


@cache
def _hub_files(repo: str, revision: str, cache_dir: str) -> tuple[str, Path, Path]:
    """(commit, model.onnx, selected_tags.csv) of `repo` at `revision`: downloaded, or from the cache.

    Memoised for the process (failures are not), so a flow run asks the Hub once however many cache
    keys it computes. The second file is fetched at the commit the first resolved to: both come from
    one snapshot even if the branch moves in between, and a cached commit needs no request at all.
    """
    from huggingface_hub import hf_hub_download

    commit, paths = revision, []
    for filename in (MODEL_FILE, TAGS_FILE):
        try:
            path = Path(hf_hub_download(repo, filename, revision=commit, cache_dir=cache_dir))
        except Exception as e:  # offline without the file, no network, unknown repo/revision/file ...
            raise _hub_error(repo, revision, filename, cache_dir, e) from e
        if path.parent.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<commit>/<file>
            commit = path.parent.name
        paths.append(path)
    log.info("tagger %s@%s resolved to commit %s", repo, revision, commit)
    return commit, paths[0], paths[1]


class ResolvedTagger(BaseModel, frozen=True):
    """The tagger files a run uses, where they came from, and what their bytes hash to."""

    repo: str  # Hugging Face repo, or the local folder when tagger.path is set
    revision: str  # the configured branch, tag or commit ("local" for a folder)
    commit: str  # the commit the revision resolved to ("local" for a folder)
    model: Path
    tags_csv: Path
    fingerprint: dict[str, str]  # sha256 of model.onnx and selected_tags.csv

    def key_inputs(self) -> dict[str, str]:
        """What a stage key needs from the tagger: the commit and the files' bytes."""
        return {"commit": self.commit, **self.fingerprint}

    def record_info(self) -> dict[str, str]:
        """Provenance for a stage record's info."""
        return {"tagger_repo": self.repo, "tagger_revision": self.revision, "tagger_commit": self.commit}


def resolve_tagger(tcfg: TaggerConfig) -> ResolvedTagger:
    """Find the configured tagger's files: `tagger.path` if set, else `tagger.repo` at `tagger.revision`.

    A Hub tagger is resolved (downloaded, or read from the cache under HF_HUB_OFFLINE=1) once per
    process; later calls, e.g. from cache-key computations, make no Hub request. File hashes are
    memoised on (path, size, mtime), so a changed local model is noticed.
    """
    from tagdit.files import file_fingerprint

    if tcfg.path is not None:
        model, tags = _local_files(tcfg.path)
        repo, revision, commit = str(tcfg.path), "local", "local"
    else:
        from huggingface_hub import constants

        repo, revision = tcfg.repo, tcfg.revision
        with _RESOLVE_LOCK:  # tasks computing keys in parallel threads still make one request set
            commit, model, tags = _hub_files(repo, revision, str(constants.HF_HUB_CACHE))
    return ResolvedTagger(repo=repo, revision=revision, commit=commit, model=model, tags_csv=tags,
                          fingerprint={"model": file_fingerprint(model), "tags": file_fingerprint(tags)})


def default_preprocess_threads() -> int:
    """Images decoded / preprocessed at once: a fast GPU model (fixed batch 1 especially) outruns one thread."""
    return min(4, os.cpu_count() or 1)


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
        cpu_batch_size: int = 2,
        providers: Sequence[str] | None = None,
        threads: int = 0,
        preprocess_threads: int | None = None,
        resize: str = "pillow",
    ):
        import_onnxruntime()  # first: a missing onnxruntime is named before anything else fails

        self.model_path, self.tags_csv = Path(model_path), Path(tags_csv)
        self.resize, self._preprocess = resize, WD_RESIZE[resize]  # tagger.resize: pillow (the reference) | torch
        self.labels = TagLabels.from_csv(tags_csv)
        self.session, self.runs, on_cpu = open_session(model_path, providers, threads)
        self.preprocess_threads = preprocess_threads or default_preprocess_threads()
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        n, h, w, c = inp.shape  # NHWC; the batch dim is an int when fixed, a str/None when dynamic
        if not (isinstance(h, int) and h == w and c == 3):
            raise ValueError(f"{model_path}: expected NHWC [N, S, S, 3] input, got {inp.shape}")
        self.size = h
        self.fixed_batch = n if isinstance(n, int) and n > 0 else None
        # a dynamic batch: `batch_size` per run on a GPU; on a CPU, `cpu_batch_size` per run, `runs` at
        # once (a small batch's activations stay in cache, and a chunk of a few images keeps every core busy)
        self.batch_size = self.fixed_batch or (cpu_batch_size if on_cpu else batch_size)
        self.general_threshold, self.character_threshold = general_threshold, character_threshold
        self.mcut, self.exclude = mcut, tuple(exclude)
        log.info("tagger %s: input %s %s, batch %s, providers %s", model_path, self.input_name,
                 inp.shape, self.fixed_batch or f"dynamic ({self.runs} x {self.batch_size})", self.session.get_providers())

    @classmethod
    def from_dir(cls, path: str | Path, **kw: Any) -> WDTagger:
        return cls(*_local_files(path), **kw)

    @classmethod
    def from_config(cls, tcfg: TaggerConfig, **kw: Any) -> WDTagger:
        r = resolve_tagger(tcfg)
        return cls(r.model, r.tags_csv, tcfg.general_threshold, tcfg.character_threshold, tcfg.mcut,
                   tcfg.exclude, tcfg.batch_size, tcfg.cpu_batch_size, resize=tcfg.resize, **kw)

    @property
    def names(self) -> list[str]:
        return self.labels.names

    def preprocess(self, img: Image.Image) -> np.ndarray:
        """PIL image -> (S, S, 3) float32 BGR 0-255: the reference recipe (with torch's resize if so set)."""
        return self._preprocess(img, self.size)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) preprocessed -> (N, T) probabilities; splits N for fixed-batch models."""
        step = self.fixed_batch or len(batch) or 1
        outs = [self.session.run([self.output_name], {self.input_name: batch[i : i + step]})[0]
                for i in range(0, len(batch), step)]
        return np.concatenate(outs) if outs else np.zeros((0, len(self.names)), np.float32)

    def select_tags(self, probs: np.ndarray) -> TagResult:
        return select_tags(probs, self.labels, self.general_threshold, self.character_threshold,
                           self.mcut, self.exclude)

    def _preprocessed(self, images: Iterable[Image.Image | object]) -> Iterator[np.ndarray | object]:
        """Each image as (S, S, 3), in input order, `preprocess_threads` at a time; BATCH_END passes."""
        from concurrent.futures import ThreadPoolExecutor

        ahead = 2 * self.preprocess_threads  # images in flight: enough to keep every thread busy
        pool = ThreadPoolExecutor(self.preprocess_threads, thread_name_prefix="wd-preprocess")
        pending: deque = deque()
        try:
            for img in images:
                pending.append(img if img is BATCH_END else pool.submit(self.preprocess, img))
                while len(pending) > ahead:
                    item = pending.popleft()
                    yield item if item is BATCH_END else item.result()
            while pending:
                item = pending.popleft()
                yield item if item is BATCH_END else item.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _batches(self, images: Iterable[Image.Image | object]) -> Iterator[np.ndarray]:
        """Preprocessed batches (n <= batch_size, S, S, 3); a BATCH_END closes one early."""
        shape = (self.batch_size, self.size, self.size, 3)
        batch, n = np.empty(shape, np.float32), 0  # (B, S, S, 3)
        for item in self._preprocessed(images):
            if item is not BATCH_END:
                batch[n] = item
                n += 1
            if n and (n == self.batch_size or item is BATCH_END):
                yield batch[:n]
                batch, n = np.empty(shape, np.float32), 0
        if n:
            yield batch[:n]

    def probabilities(self, images: Iterable[Image.Image | object]) -> Iterator[np.ndarray]:
        """(T,) probabilities per image; the next batches are preprocessed (in a thread pool) while
        this one runs, so a fixed-batch-1 model on a GPU is not starved by one preprocessing core.
        On a CPU `runs` batches run at once, each on one thread; results keep the input order.

        A `BATCH_END` item closes the current batch early: results can differ in the last float
        bits with batch composition, so callers that need reproducible bytes pin batches to units.
        """
        batches = prefetch(self._batches(images), depth=2, name="wd-batches")
        if self.runs == 1:
            for batch in batches:
                yield from self.predict(batch)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.runs, thread_name_prefix="wd-run") as pool:  # session.run is thread-safe
            pending: deque = deque()
            try:
                for batch in batches:
                    pending.append(pool.submit(self.predict, batch))
                    while len(pending) > self.runs:
                        yield from pending.popleft().result()
                while pending:
                    yield from pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()

    def tag_images(self, images: Iterable[Image.Image | object]) -> Iterator[TagResult]:
        """TagResult per image, in input order."""
        for p in self.probabilities(images):
            yield self.select_tags(p)

