"""The hand-written Inception-v3: torchvision's state-dict layout, the FID network, features, preprocessing,
weight lookup."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.inception import (
    FID_WEIGHTS,
    TORCHVISION_WEIGHTS,
    InceptionV3,
    _avg3,
    _avg3_tf,
    _max3,
    find_inception_weights,
    inception_features,
    load_inception,
    preprocess,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# torchvision.models.inception_v3's conv layers without AuxLogits, read off torchvision 0.29's model:
# `module | block out x in x kh x kw, ...` ("-" = the module is itself a conv block). Every block is
# conv.weight + bn.{weight, bias, running_mean, running_var, num_batches_tracked}; then fc (1000 x 2048).
TORCHVISION_CONVS = """
Conv2d_1a_3x3 | - 32x3x3x3
Conv2d_2a_3x3 | - 32x32x3x3
Conv2d_2b_3x3 | - 64x32x3x3
Conv2d_3b_1x1 | - 80x64x1x1
Conv2d_4a_3x3 | - 192x80x3x3
Mixed_5b | branch1x1 64x192x1x1, branch5x5_1 48x192x1x1, branch5x5_2 64x48x5x5, branch3x3dbl_1 64x192x1x1, branch3x3dbl_2 96x64x3x3, branch3x3dbl_3 96x96x3x3, branch_pool 32x192x1x1
Mixed_5c | branch1x1 64x256x1x1, branch5x5_1 48x256x1x1, branch5x5_2 64x48x5x5, branch3x3dbl_1 64x256x1x1, branch3x3dbl_2 96x64x3x3, branch3x3dbl_3 96x96x3x3, branch_pool 64x256x1x1
Mixed_5d | branch1x1 64x288x1x1, branch5x5_1 48x288x1x1, branch5x5_2 64x48x5x5, branch3x3dbl_1 64x288x1x1, branch3x3dbl_2 96x64x3x3, branch3x3dbl_3 96x96x3x3, branch_pool 64x288x1x1
Mixed_6a | branch3x3 384x288x3x3, branch3x3dbl_1 64x288x1x1, branch3x3dbl_2 96x64x3x3, branch3x3dbl_3 96x96x3x3
Mixed_6b | branch1x1 192x768x1x1, branch7x7_1 128x768x1x1, branch7x7_2 128x128x1x7, branch7x7_3 192x128x7x1, branch7x7dbl_1 128x768x1x1, branch7x7dbl_2 128x128x7x1, branch7x7dbl_3 128x128x1x7, branch7x7dbl_4 128x128x7x1, branch7x7dbl_5 192x128x1x7, branch_pool 192x768x1x1
Mixed_6c | branch1x1 192x768x1x1, branch7x7_1 160x768x1x1, branch7x7_2 160x160x1x7, branch7x7_3 192x160x7x1, branch7x7dbl_1 160x768x1x1, branch7x7dbl_2 160x160x7x1, branch7x7dbl_3 160x160x1x7, branch7x7dbl_4 160x160x7x1, branch7x7dbl_5 192x160x1x7, branch_pool 192x768x1x1
Mixed_6d | branch1x1 192x768x1x1, branch7x7_1 160x768x1x1, branch7x7_2 160x160x1x7, branch7x7_3 192x160x7x1, branch7x7dbl_1 160x768x1x1, branch7x7dbl_2 160x160x7x1, branch7x7dbl_3 160x160x1x7, branch7x7dbl_4 160x160x7x1, branch7x7dbl_5 192x160x1x7, branch_pool 192x768x1x1
Mixed_6e | branch1x1 192x768x1x1, branch7x7_1 192x768x1x1, branch7x7_2 192x192x1x7, branch7x7_3 192x192x7x1, branch7x7dbl_1 192x768x1x1, branch7x7dbl_2 192x192x7x1, branch7x7dbl_3 192x192x1x7, branch7x7dbl_4 192x192x7x1, branch7x7dbl_5 192x192x1x7, branch_pool 192x768x1x1
Mixed_7a | branch3x3_1 192x768x1x1, branch3x3_2 320x192x3x3, branch7x7x3_1 192x768x1x1, branch7x7x3_2 192x192x1x7, branch7x7x3_3 192x192x7x1, branch7x7x3_4 192x192x3x3
Mixed_7b | branch1x1 320x1280x1x1, branch3x3_1 384x1280x1x1, branch3x3_2a 384x384x1x3, branch3x3_2b 384x384x3x1, branch3x3dbl_1 448x1280x1x1, branch3x3dbl_2 384x448x3x3, branch3x3dbl_3a 384x384x1x3, branch3x3dbl_3b 384x384x3x1, branch_pool 192x1280x1x1
Mixed_7c | branch1x1 320x2048x1x1, branch3x3_1 384x2048x1x1, branch3x3_2a 384x384x1x3, branch3x3_2b 384x384x3x1, branch3x3dbl_1 448x2048x1x1, branch3x3dbl_2 384x448x3x3, branch3x3dbl_3a 384x384x1x3, branch3x3dbl_3b 384x384x3x1, branch_pool 192x2048x1x1
"""


def torchvision_layout() -> dict[str, tuple[int, ...]]:
    """key -> shape of torchvision's inception_v3 state dict without AuxLogits.*, from the table above."""
    out: dict[str, tuple[int, ...]] = {}
    for line in TORCHVISION_CONVS.strip().splitlines():
        module, convs = (s.strip() for s in line.split("|"))
        for conv in convs.split(", "):
            name, shape = conv.split()
            prefix = module if name == "-" else f"{module}.{name}"
            dims = tuple(int(d) for d in shape.split("x"))
            out[f"{prefix}.conv.weight"] = dims
            out |= {f"{prefix}.bn.{p}": dims[:1] for p in ("weight", "bias", "running_mean", "running_var")}
            out[f"{prefix}.bn.num_batches_tracked"] = ()
    return out | {"fc.weight": (1000, 2048), "fc.bias": (1000,)}


def test_state_dict_has_torchvision_inception_v3_keys_and_shapes_without_aux_logits():
    model = InceptionV3()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == torchvision_layout()
    n = sum(p.numel() for p in model.parameters())
    # torchvision: 27,161,264 with AuxLogits (5,326,696 of them); 21,785,568 without fc either
    assert n == 23_834_568 and n - model.fc.weight.numel() - model.fc.bias.numel() == 21_785_568


def torchvision_file(path: Path, classes: int = 1000) -> dict[str, torch.Tensor]:
    """A torchvision-layout file: seeded values, AuxLogits keys, no num_batches_tracked (as pre-0.4.1 torch
    saved); `classes` = 1008 gives pytorch-fid's FID-weights layout (which has no AuxLogits)."""
    g = torch.Generator().manual_seed(0)
    layout = torchvision_layout() | {"fc.weight": (classes, 2048), "fc.bias": (classes,)}
    state = {k: (torch.randn(s, generator=g) * 0.05 if "running_var" not in k else torch.rand(s, generator=g) + 0.5)
             for k, s in layout.items() if not k.endswith("num_batches_tracked")}
    if classes == 1000:
        state |= {"AuxLogits.conv0.conv.weight": torch.zeros(128, 768, 1, 1), "AuxLogits.fc.weight": torch.zeros(1000, 768)}
    torch.save(state, path)
    return state


def test_a_torchvision_file_loads_strictly_with_aux_logits_dropped(tmp_path: Path):
    state = torchvision_file(tmp_path / TORCHVISION_WEIGHTS.file)
    model, weights = load_inception(tmp_path / TORCHVISION_WEIGHTS.file)
    assert weights == TORCHVISION_WEIGHTS and model.Mixed_5b.pool is _avg3
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert torch.equal(model.Mixed_7c.branch3x3dbl_3b.conv.weight, state["Mixed_7c.branch3x3dbl_3b.conv.weight"])
    assert torch.equal(model.Mixed_6e.branch7x7dbl_5.bn.running_var, state["Mixed_6e.branch7x7dbl_5.bn.running_var"])
    del state["Mixed_5b.branch_pool.bn.bias"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match="Mixed_5b.branch_pool.bn.bias"):
        load_inception(tmp_path / "broken.pth")


def test_the_fid_weights_load_onto_the_fid_network_tensorflow_pooling_and_a_max_pool_in_mixed_7c(tmp_path: Path):
    torchvision_file(tmp_path / "any-name.pth", classes=1008)
    model, weights = load_inception(tmp_path / "any-name.pth")  # recognised by its 1008-class head
    assert weights == FID_WEIGHTS and weights.name == "pt_inception-2015-12-05"
    assert model.Mixed_5b.pool is _avg3_tf and model.Mixed_6e.pool is _avg3_tf and model.Mixed_7b.pool is _avg3_tf
    assert model.Mixed_7c.pool is _max3 and model.fc.out_features == 1008
    x = torch.ones(1, 1, 3, 3)
    assert float(_avg3_tf(x)[0, 0, 0, 0]) == 1.0 and float(_avg3(x)[0, 0, 0, 0]) == pytest.approx(4 / 9)


@pytest.mark.numerics
def test_features_are_2048_d_finite_and_differ_between_images():
    torch.manual_seed(0)
    model = InceptionV3().eval()
    images = [Image.new("RGB", (16, 16), (200, 30, 30)), Image.new("RGB", (24, 20), (0, 90, 250))]  # sizes may differ
    feats = inception_features(model, images, batch=2)
    assert feats.shape == (2, 2048) and feats.dtype == np.float64
    small = inception_features(model, iter(images), size=75, batch=1)  # the original's 75 px; any iterable
    assert small.shape == (2, 2048) and np.isfinite(small).all() and not np.allclose(small, feats)
    assert np.isfinite(feats).all() and not np.allclose(feats[0], feats[1], rtol=0, atol=0)
    assert inception_features(model, []).shape == (0, 2048)


@pytest.mark.numerics
def test_preprocess_takes_uint8_or_minus_one_to_one_and_resizes_bilinearly_without_antialiasing():
    x = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    a, b = preprocess(x), preprocess(x.float() / 127.5 - 1)
    assert a.shape == (2, 3, 299, 299) and a.dtype == torch.float32
    assert torch.allclose(a, b, atol=1e-6) and -1 <= float(a.min()) and float(a.max()) <= 1
    same = torch.rand(1, 3, 299, 299) * 2 - 1
    assert torch.equal(preprocess(same), same)  # already 299 px: untouched
    big = torch.rand(1, 3, 256, 256) * 2 - 1
    down = torch.nn.functional.interpolate(big, size=(75, 75), mode="bilinear", align_corners=False)
    assert torch.equal(preprocess(big, 75), down)  # Keras' layer_resizing (the original's): no antialiasing


def test_weights_come_from_the_explicit_path_else_torch_hubs_cache_fid_first_else_none(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert find_inception_weights(None) is None
    cached = tmp_path / "hub" / "checkpoints" / TORCHVISION_WEIGHTS.file
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert find_inception_weights(None) == cached
    fid = cached.with_name("pt_inception-2015-12-05-6726825d.pth")
    fid.write_bytes(b"z")
    assert find_inception_weights(None) == fid
    own = tmp_path / "mine.pth"
    own.write_bytes(b"y")
    assert find_inception_weights(own) == own
    with pytest.raises(FileNotFoundError, match="evaluate.inception_weights"):
        find_inception_weights(tmp_path / "missing.pth")
