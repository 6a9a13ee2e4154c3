import numpy as np
import pytest
from PIL import Image

from tagdit.config import TaggerConfig
from tagdit.tagger import (
    TaggerNotFoundError,
    TagLabels,
    WDTagger,
    display_name,
    mcut_threshold,
    select_tags,
    wd_preprocess,
)
from tests.wd_fixture import build_wd_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_wd_model(tmp_path_factory.mktemp("wd"))


def reference_prepare(image: Image.Image, size: int) -> np.ndarray:
    """SmilingWolf's wd-tagger `prepare_image`, written out as in the reference app."""
    image = image.convert("RGBA")
    canvas = Image.new("RGBA", image.size, (255, 255, 255))
    canvas.alpha_composite(image)
    image = canvas.convert("RGB")
    max_dim = max(image.size)
    pad_left = (max_dim - image.size[0]) // 2
    pad_top = (max_dim - image.size[1]) // 2
    padded = Image.new("RGB", (max_dim, max_dim), (255, 255, 255))
    padded.paste(image, (pad_left, pad_top))
    if max_dim != size:
        padded = padded.resize((size, size), Image.BICUBIC)
    return np.asarray(padded, dtype=np.float32)[:, :, ::-1]


def test_preprocessing_matches_reference_wd_recipe():
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (37, 61, 4), dtype=np.uint8)
    images = [
        Image.fromarray(rgba, "RGBA"),
        Image.fromarray(rgba[..., :3], "RGB"),
        Image.fromarray(rng.integers(0, 256, (80, 20, 3), dtype=np.uint8), "RGB"),
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB"),  # already square
        Image.fromarray(rgba[..., 0], "L"),
    ]
    for img in images:
        ours, ref = wd_preprocess(img, 448), reference_prepare(img, 448)
        assert ours.dtype == np.float32 and ours.shape == (448, 448, 3)
        np.testing.assert_array_equal(ours, ref)


def test_tagger_reads_interface_from_session_and_tags_by_colour(model_dir):
    tagger = WDTagger.from_dir(model_dir)
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


def test_fixed_batch_model_gives_same_probabilities(tmp_path, model_dir):
    fixed = WDTagger.from_dir(build_wd_model(tmp_path / "fixed", fixed_batch=1))
    dynamic = WDTagger.from_dir(model_dir, batch_size=4)
    assert fixed.fixed_batch == 1 and fixed.batch_size == 1
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(5)]
    a = np.stack(list(fixed.probabilities(imgs)))
    b = np.stack(list(dynamic.probabilities(imgs)))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    batch = np.stack([fixed.preprocess(i) for i in imgs])
    np.testing.assert_allclose(fixed.predict(batch), a, rtol=0, atol=1e-4)


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


def test_missing_tagger_offline_names_repo_cache_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(TaggerNotFoundError) as e:
        WDTagger.from_config(TaggerConfig(repo="SmilingWolf/wd-v1-4-moat-tagger-v2"))
    msg = str(e.value)
    assert "SmilingWolf/wd-v1-4-moat-tagger-v2" in msg and "tagger.path" in msg and "cache" in msg
    with pytest.raises(TaggerNotFoundError, match="model.onnx"):
        WDTagger.from_config(TaggerConfig(path=tmp_path))


def test_batch_end_marker_pins_batches_without_changing_order(model_dir):
    from tagdit.tagger import BATCH_END

    tagger = WDTagger.from_dir(model_dir, batch_size=4)
    imgs = [Image.new("RGB", (20, 20), (i * 40, 0, 255 - i * 40)) for i in range(6)]
    sizes = []
    real = tagger.predict
    tagger.predict = lambda b: sizes.append(len(b)) or real(b)
    probs = list(tagger.probabilities([*imgs[:3], BATCH_END, *imgs[3:], BATCH_END]))
    assert sizes == [3, 3] and len(probs) == 6
    np.testing.assert_allclose(np.stack(probs), real(np.stack([tagger.preprocess(i) for i in imgs])), atol=1e-4)
