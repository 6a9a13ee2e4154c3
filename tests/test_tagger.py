import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tagdit.config import TaggerConfig
from tagdit.data.tagger import (
    MODEL_FILE,
    TAGS_FILE,
    TaggerNotFoundError,
    WDTagger,
    _hub_files,
    mcut_threshold,
    resolve_tagger,
    select_tags,
)
from tagdit.demo.stand_in_taggers import build_wd_model, drawn_image
from tagdit.files import sha256_file
from tagdit.formats.selected_tags import TagLabels, display_name
from tagdit.formats.wd_image import wd_preprocess
from tests.wd_fixture import reference_prepare


def recipe_images() -> list[Image.Image]:
    """Alpha, RGB, tall, square, greyscale, large ones (one with alpha) and one already at 448."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (37, 61, 4), dtype=np.uint8)
    return [
        Image.fromarray(rgba, "RGBA"),
        Image.fromarray(rgba[..., :3], "RGB"),
        Image.fromarray(rng.integers(0, 256, (80, 20, 3), dtype=np.uint8), "RGB"),
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB"),  # already square
        Image.fromarray(rgba[..., 0], "L"),
        Image.fromarray(rng.integers(0, 256, (700, 530, 3), dtype=np.uint8), "RGB"),
        drawn_image(rng, 1300, 900, "RGBA"),  # large, transparent outside an ellipse
        Image.fromarray(rng.integers(0, 256, (448, 448, 3), dtype=np.uint8), "RGB"),
    ]


def test_default_preprocessing_is_the_reference_recipe_bit_for_bit(wd_model):
    tagger = WDTagger.from_dir(wd_model)
    assert tagger.resize == "pillow"
    for img in recipe_images():
        ref = reference_prepare(img, 448)
        ours = tagger.preprocess(img)
        assert ours.dtype == np.float32 and ours.shape == (448, 448, 3)
        np.testing.assert_array_equal(ours, ref)
        np.testing.assert_array_equal(wd_preprocess(img, 448), ref)


def test_torch_resize_opt_in_is_within_two_levels_of_the_reference(wd_model):
    tagger = WDTagger.from_dir(wd_model, resize="torch")
    for img in recipe_images():
        ours, ref = tagger.preprocess(img), reference_prepare(img, 448)
        diff = np.abs(ours - ref)
        assert diff.max() <= 2  # torch's antialiased bicubic vs Pillow's: rounding only
        assert (diff > 0).mean() < 0.02
        if img.size == (448, 448):
            np.testing.assert_array_equal(ours, ref)  # no resize: identical


def test_tagger_reads_interface_from_session_and_tags_by_colour(wd_model):
    tagger = WDTagger.from_dir(wd_model)
    assert (tagger.input_name, tagger.output_name, tagger.size) == ("input_1:0", "predictions_sigmoid", 448)
    assert tagger.fixed_batch is None
    colours = {(255, 0, 0): "red", (0, 0, 255): "test character", (255, 255, 0): "^_^", (0, 0, 0): "dark"}
    imgs = [Image.new("RGB", (50, 46 + i), c) for i, c in enumerate(colours)] * 3  # odd batch split
    results = list(tagger.tag_images(imgs))
    assert len(results) == len(imgs)
    for res, want in zip(results, list(colours.values()) * 3, strict=True):
        assert want in res.tags
        assert res.scores == sorted(res.scores, reverse=True)
        assert res.rating in {"general", "sensitive", "questionable", "explicit"}
    # padded with white: a small red image on a wide canvas is redder than white
    assert "blue" in results[1].tags and "test character" in results[1].tags


def test_fixed_batch_model_gives_same_probabilities(tmp_path, wd_model):
    fixed = WDTagger.from_dir(build_wd_model(tmp_path / "fixed", fixed_batch=1))
    dynamic = WDTagger.from_dir(wd_model, batch_size=4)
    assert fixed.fixed_batch == 1 and fixed.batch_size == 1
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(5)]
    a = np.stack(list(fixed.probabilities(imgs)))
    b = np.stack(list(dynamic.probabilities(imgs)))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    batch = np.stack([fixed.preprocess(i) for i in imgs])
    np.testing.assert_allclose(fixed.predict(batch), a, rtol=0, atol=1e-4)


def test_concurrent_cpu_runs_keep_the_input_order(wd_model):
    one = WDTagger.from_dir(wd_model, cpu_batch_size=1, threads=1, providers=["CPUExecutionProvider"])
    three = WDTagger.from_dir(wd_model, cpu_batch_size=1, threads=3, providers=["CPUExecutionProvider"])
    assert (one.runs, three.runs) == (1, 3) and one.batch_size == three.batch_size == 1  # same floats per image
    rng = np.random.default_rng(2)
    imgs = [Image.new("RGB", (30 + i, 40), tuple(int(c) for c in rng.integers(0, 256, 3))) for i in range(11)]
    a = np.stack(list(one.probabilities(imgs)))  # (11, T)
    b = np.stack(list(three.probabilities(imgs)))  # 11 runs of 1, 3 at a time
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    assert len({tuple(np.round(p, 4)) for p in a}) > 5  # the images differ, so an order mix-up would show


def test_select_tags_thresholds_are_strict_and_character_threshold_separate():
    labels = TagLabels(["general", "sensitive", "questionable", "explicit", "a", "b", "char"],
                       np.array([9, 9, 9, 9, 0, 0, 4]))
    p = np.array([0.1, 0.7, 0.1, 0.1, 0.35, 0.36, 0.84], np.float32)
    res = select_tags(p, labels)
    assert res.tags == ["b"] and res.rating == "sensitive"
    p[6] = 0.9
    assert select_tags(p, labels).tags == ["char", "b"]
    assert select_tags(p, labels, exclude=["b"]).tags == ["char"]


def test_mcut_cuts_at_largest_gap_and_keeps_characters_above_015():
    assert mcut_threshold(np.array([0.9, 0.8, 0.2, 0.1])) == pytest.approx(0.5)
    labels = TagLabels(["general", "sensitive", "questionable", "explicit", "a", "b", "c", "x", "y"],
                       np.array([9, 9, 9, 9, 0, 0, 0, 4, 4]))
    p = np.array([0.9, 0, 0, 0, 0.3, 0.28, 0.05, 0.12, 0.02], np.float32)
    res = select_tags(p, labels, mcut=True)
    assert res.tags == ["a", "b"]  # fixed thresholds would keep none; char 0.12 < 0.15 floor


def test_underscores_become_spaces_except_kaomoji():
    assert display_name("long_hair") == "long hair"
    assert display_name("^_^") == "^_^" and display_name(">_<") == ">_<"


REPO, COMMIT, COMMIT2 = "org/tiny-tagger", "a" * 40, "b" * 40


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache folder, offline, with the process's resolve memo cleared."""
    import huggingface_hub.constants as hf

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))  # the constants were read at import
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    _hub_files.cache_clear()
    yield cache
    _hub_files.cache_clear()


def cache_snapshot(cache: Path, wd_model: Path, commit: str = COMMIT, ref: str = "main",
                   files: tuple[str, ...] = (MODEL_FILE, TAGS_FILE)) -> Path:
    """Lay out `files` of the fixture tagger as the HF cache holds `REPO` at `commit`, `ref` -> commit."""
    repo = cache / ("models--" + REPO.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in files:
        shutil.copy(wd_model / f, snap / f)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap


def test_offline_tagger_resolves_from_hf_cache_to_the_cached_commit(hf_cache, wd_model):
    snap = cache_snapshot(hf_cache, wd_model)
    r = resolve_tagger(TaggerConfig(repo=REPO))
    assert (r.repo, r.revision, r.commit) == (REPO, "main", COMMIT)
    assert r.model == snap / MODEL_FILE and r.tags_csv == snap / TAGS_FILE
    assert r.fingerprint == {"model": sha256_file(wd_model / MODEL_FILE), "tags": sha256_file(wd_model / TAGS_FILE)}
    assert r.key_inputs() == {"commit": COMMIT, **r.fingerprint}
    assert r.record_info() == {"tagger_repo": REPO, "tagger_revision": "main", "tagger_commit": COMMIT}
    assert resolve_tagger(TaggerConfig(repo=REPO, revision=COMMIT)).commit == COMMIT  # a pinned commit
    tagger = WDTagger.from_config(TaggerConfig(repo=REPO))
    assert tagger.model_path == snap / MODEL_FILE
    assert "red" in next(tagger.tag_images([Image.new("RGB", (30, 30), (255, 0, 0))])).tags
    with pytest.raises(TaggerNotFoundError, match="'v9'"):  # a ref the cache has never seen
        resolve_tagger(TaggerConfig(repo=REPO, revision="v9"))


def test_missing_tagger_file_error_names_repo_file_revision_and_cache(hf_cache, wd_model, tmp_path):
    with pytest.raises(TaggerNotFoundError) as e:
        WDTagger.from_config(TaggerConfig(repo="SmilingWolf/wd-v1-4-moat-tagger-v2"))
    msg = str(e.value)
    for part in ("SmilingWolf/wd-v1-4-moat-tagger-v2", "'model.onnx'", "'main'", str(hf_cache), "HF_HUB_OFFLINE",
                 "tagger.path"):
        assert part in msg
    cache_snapshot(hf_cache, wd_model, files=(MODEL_FILE,))  # the model is cached, its tag list is not
    with pytest.raises(TaggerNotFoundError) as e:
        resolve_tagger(TaggerConfig(repo=REPO))
    msg = str(e.value)
    assert REPO in msg and "'selected_tags.csv'" in msg and str(hf_cache) in msg and "model.onnx'" not in msg
    with pytest.raises(TaggerNotFoundError, match="model.onnx"):
        WDTagger.from_config(TaggerConfig(path=tmp_path))


def test_local_tagger_path_resolves_as_local_without_a_hub_call(wd_model, monkeypatch):
    def no_hub(*a, **kw):
        raise AssertionError("tagger.path must not touch the Hub")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_hub)
    r = resolve_tagger(TaggerConfig(path=wd_model, repo="ignored/repo"))
    assert (r.repo, r.revision, r.commit) == (str(wd_model), "local", "local")
    assert (r.model, r.tags_csv) == (wd_model / MODEL_FILE, wd_model / TAGS_FILE)
    assert r.fingerprint["model"] == sha256_file(wd_model / MODEL_FILE)


def test_tagging_and_repeated_cache_keys_ask_the_hub_once_per_file(hf_cache, world, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    from tagdit.config import load_config
    from tasks.crop import crop_stage
    from tasks.evaluate import EVALUATE
    from tasks.tag import TAG, chunk_digest, tag_stage

    src, wd = world
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", False)
    head = {"main": COMMIT}  # what the fake Hub's branch points at
    calls = []

    def fake_download(repo, filename, revision=None, cache_dir=None, **kw):
        calls.append((filename, revision))
        commit = head.get(revision, revision)
        snap = Path(cache_dir) / ("models--" + repo.replace("/", "--")) / "snapshots" / commit
        snap.mkdir(parents=True, exist_ok=True)
        shutil.copy(wd / filename, snap / filename)
        return str(snap / filename)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    cfg = load_config(None, [f"data.source={src}", f"data.root={tmp_path / 'shards'}", "data.name=t",
                             "data.resolution=32", "crop.max_pixels=1000000", "crop.workers=1",
                             "data.buckets=4", f"tagger.repo={REPO}"])
    crop = crop_stage(cfg)
    assert len(crop.info["chunks"]) >= 3
    rec = tag_stage(cfg, crop)
    for _ in range(3):
        TAG.key(cfg, {"crop": crop})
        EVALUATE.extra_inputs(cfg)
        [chunk_digest(cfg, Path(crop.out_dir) / c) for c in crop.info["chunks"]]
    assert tag_stage(cfg, crop) == rec  # the cached record
    assert calls == [(MODEL_FILE, "main"), (TAGS_FILE, COMMIT)]  # the second file from the same snapshot
    assert rec.info["tagger_commit"] == COMMIT and rec.info["tagger_revision"] == "main"
    # a new commit with the same files: the key and record change, no chunk is re-tagged
    head["main"] = COMMIT2
    _hub_files.cache_clear()  # a new flow run (process)
    chunks = {p: p.stat().st_mtime_ns for p in Path(rec.out_dir).glob("chunk-*")}
    rec2 = tag_stage(cfg, crop)
    assert rec2.key != rec.key and rec2.info["tagger_commit"] == COMMIT2 and rec2.info["chunks"] == rec.info["chunks"]
    assert {p: p.stat().st_mtime_ns for p in Path(rec.out_dir).glob("chunk-*")} == chunks
    assert len(calls) == 4


def test_batch_end_marker_pins_batches_without_changing_order(wd_model):
    from tagdit.data.tagger import BATCH_END

    tagger = WDTagger.from_dir(wd_model, cpu_batch_size=4, threads=1)  # one run: batches of 4
    imgs = [Image.new("RGB", (20, 20), (i * 40, 0, 255 - i * 40)) for i in range(6)]
    sizes = []
    real = tagger.predict
    tagger.predict = lambda b: sizes.append(len(b)) or real(b)
    probs = list(tagger.probabilities([*imgs[:3], BATCH_END, *imgs[3:], BATCH_END]))
    assert sizes == [3, 3] and len(probs) == 6
    np.testing.assert_allclose(np.stack(probs), real(np.stack([tagger.preprocess(i) for i in imgs])), atol=1e-4)


@pytest.mark.parametrize(("available", "want"), [
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
     ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    (["AzureExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
])
def test_default_providers_put_cuda_first_when_onnxruntime_has_it(monkeypatch, available, want):
    import onnxruntime

    from tagdit.data.onnx_session import default_providers

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: available)
    assert default_providers() == want


def test_tagger_asks_for_cuda_when_available_and_warns_when_it_cannot_start(monkeypatch, wd_model, caplog):
    import onnxruntime

    asked, real = [], onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda *a, providers: asked.append(providers) or real(
        *a, providers=["CPUExecutionProvider"]))  # this machine's build has no CUDA provider
    tagger = WDTagger.from_dir(wd_model)
    assert asked == [["CUDAExecutionProvider", "CPUExecutionProvider"]]
    assert tagger.session.get_providers() == ["CPUExecutionProvider"] and "CUDA provider" in caplog.text
    assert "red" in next(tagger.tag_images([Image.new("RGB", (30, 30), (255, 0, 0))])).tags


class CountingSession:
    """An onnxruntime session that records the batch size of every run."""

    def __init__(self, session):
        self.session, self.batches = session, []

    def run(self, outputs, feeds):
        self.batches.append(len(next(iter(feeds.values()))))
        return self.session.run(outputs, feeds)


def test_fixed_batch_1_model_runs_per_image_and_dynamic_model_in_batches(tmp_path, wd_model):
    rng = np.random.default_rng(2)
    colours = rng.integers(0, 256, (7, 1, 1, 3))  # distinct mean colours: distinct probabilities
    imgs = [Image.fromarray(np.clip(c + rng.integers(-20, 21, (30 + i, 40, 3)), 0, 255).astype(np.uint8))
            for i, c in enumerate(colours)]
    fixed = WDTagger.from_dir(build_wd_model(tmp_path / "fixed", fixed_batch=1), preprocess_threads=3)
    dynamic = WDTagger.from_dir(wd_model, cpu_batch_size=3, preprocess_threads=3, threads=1)  # one run: batches of 3
    fixed.session, dynamic.session = CountingSession(fixed.session), CountingSession(dynamic.session)
    a, b = np.stack(list(fixed.probabilities(imgs))), np.stack(list(dynamic.probabilities(imgs)))
    assert fixed.session.batches == [1] * 7 and dynamic.session.batches == [3, 3, 1]
    x = np.stack([fixed.preprocess(i) for i in imgs])  # (7, S, S, 3), in input order
    def run(tagger, sizes):  # the session on x in consecutive batches of `sizes`
        starts = np.cumsum([0, *sizes])
        return np.concatenate([tagger.session.session.run(None, {tagger.input_name: x[i:j]})[0]
                               for i, j in zip(starts[:-1], starts[1:], strict=True)])

    np.testing.assert_array_equal(a, run(fixed, [1] * 7))  # in input order, whatever thread was first
    np.testing.assert_array_equal(b, run(dynamic, [3, 3, 1]))
    np.testing.assert_allclose(b, a, atol=2e-3)  # float sums differ a little with the batch size
    assert np.abs(np.diff(a, axis=0)).max() > 0.1


def test_cpu_runs_take_small_batches_side_by_side_so_a_small_chunk_keeps_every_core_busy(wd_model):
    import threading

    tagger = WDTagger.from_dir(wd_model, batch_size=16, threads=2, providers=["CPUExecutionProvider"])
    assert (tagger.runs, tagger.batch_size) == (2, 2)  # batch_size is a GPU's; cpu_batch_size (2) per CPU run
    meet = threading.Barrier(2, timeout=10)  # runs meet in pairs: both must be under way at once
    sizes, real = [], tagger.session

    class Meeting:
        def run(self, outputs, feeds):
            sizes.append(len(next(iter(feeds.values()))))
            meet.wait()
            return real.run(outputs, feeds)

    tagger.session = Meeting()
    imgs = [Image.new("RGB", (20, 20), (255, 0, 0) if i % 2 else (0, 0, 255)) for i in range(8)]
    results = list(tagger.tag_images(imgs))
    assert sizes == [2, 2, 2, 2] and [("red" in r.tags) for r in results] == [bool(i % 2) for i in range(8)]


def test_preprocessing_overlaps_in_several_threads(wd_model):
    import threading

    tagger = WDTagger.from_dir(wd_model, preprocess_threads=2)
    meet = threading.Barrier(2, timeout=10)  # the first two images must be preprocessed at the same time
    calls, real = [], tagger.preprocess

    def slow_preprocess(img):
        calls.append(threading.current_thread().name)
        if len(calls) <= 2:
            meet.wait()
        return real(img)

    tagger.preprocess = slow_preprocess
    imgs = [Image.new("RGB", (20, 20), c) for c in [(255, 0, 0), (0, 0, 255), (0, 0, 0)] * 2]
    results = list(tagger.tag_images(imgs))
    assert [("red" in r.tags, "blue" in r.tags) for r in results] == [(True, False), (False, True), (False, False)] * 2
    assert len(set(calls)) == 2 and all(n.startswith("wd-preprocess") for n in calls)


def test_closing_the_stream_early_stops_the_preprocessing_threads(wd_model):
    import threading

    tagger = WDTagger.from_dir(wd_model, batch_size=2, preprocess_threads=2)
    before = threading.active_count()
    endless = (Image.new("RGB", (20, 20), (255, 0, 0)) for _ in iter(int, 1))
    probs = tagger.probabilities(endless)
    assert len([next(probs) for _ in range(5)]) == 5
    probs.close()
    assert threading.active_count() == before


@pytest.fixture
def cuda_torch(monkeypatch):
    """torch sees one CUDA device; onnxruntime (this machine's CPU build) offers no CUDA provider."""
    import onnxruntime
    import torch

    import tagdit.data.onnx_session as onnx_mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(onnx_mod, "_WARNED_GPU_IDLE", False)
    return onnx_mod


@pytest.mark.parametrize(("installed", "says"), [
    ({"onnxruntime": "1.32.0"}, "the installed onnxruntime is the CPU build (1.32.0)"),
    ({"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.32.0"},
     "BOTH onnxruntime 1.32.0 and onnxruntime-gpu 1.32.0 are installed"),
])
def test_gpu_idle_warning_names_the_build_and_the_fix(cuda_torch, monkeypatch, installed, says):
    monkeypatch.setattr(cuda_torch, "_installed", installed.get)
    msg = cuda_torch.gpu_idle_warning()
    assert says in msg and "1 CUDA device" in msg
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install -e '.[gpu]'" in msg


def test_no_gpu_idle_warning_without_cuda_or_with_a_cuda_provider(cuda_torch, monkeypatch):
    import onnxruntime
    import torch

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert cuda_torch.gpu_idle_warning() is None
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_torch.gpu_idle_warning() is None


def test_onnxruntime_comes_from_one_extra_cpu_or_gpu_never_the_base_dependencies():
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in reqs}  # noqa: E731
    assert not names(project["dependencies"]) & {"onnxruntime", "onnxruntime-gpu"}
    extras = project["optional-dependencies"]
    assert names(extras["cpu"]) == {"onnxruntime"} and names(extras["gpu"]) == {"onnxruntime-gpu"}
    assert all(not names(v) & {"onnxruntime", "onnxruntime-gpu"} for k, v in extras.items() if k not in ("cpu", "gpu"))
