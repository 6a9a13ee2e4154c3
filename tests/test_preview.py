"""The shard stage's previews: random samples from a few manifest row groups, rejects counted by kind in Arrow."""

import pyarrow as pa

import tagdit.formats.dataset_tables as dt
from tagdit.data.preview import pick_samples, rejects_by_reason
from tagdit.formats.dataset_tables import manifest_writer, write_rejects


def test_rejects_are_counted_by_kind_most_frequent_first_with_their_first_example(tmp_path):
    reasons = ["too small: 20x30 (short side < 32)", "hidden file", "too small: 8x8 (short side < 32)",
               "decode failed (OSError: truncated)", "too small: 1x1", "hidden file"]
    parts = [pa.table({"source": [f"f{i}" for i in range(3)], "reason": reasons[:3]}),
             pa.table({"source": [f"f{i}" for i in range(3, 6)], "reason": reasons[3:]})]
    assert write_rejects(tmp_path, parts, "crop") == 6
    assert rejects_by_reason(tmp_path) == [
        {"reason": "too small", "count": 3, "stage": "crop", "example": "f0", "example reason": reasons[0]},
        {"reason": "hidden file", "count": 2, "stage": "crop", "example": "f1", "example reason": "hidden file"},
        {"reason": "decode failed", "count": 1, "stage": "crop", "example": "f3", "example reason": reasons[3]},
    ]


def test_preview_samples_read_a_few_row_groups_the_same_for_the_same_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(dt, "MANIFEST_ROW_GROUP", 16)
    with manifest_writer(tmp_path / dt.MANIFEST) as m:
        for i in range(160):
            m.add({"key": f"k{i:03d}", "split": "train", "shard": f"train-{i // 40:05d}-00.tar", "tags": ["x"]})
    read, real = [], dt.pq.ParquetFile.read_row_groups
    monkeypatch.setattr(dt.pq.ParquetFile, "read_row_groups", lambda self, g, **k: (read.append(g), real(self, g, **k))[1])
    picked = pick_samples(tmp_path, n=8, seed=3)
    assert len(picked) == 8 == len({r["key"] for r in picked}) and picked == pick_samples(tmp_path, n=8, seed=3)
    assert len(read[0]) == 2  # 2 groups of 16 rows hold 4 x 8 rows: 2 of the 10 read
    assert picked != pick_samples(tmp_path, n=8, seed=4)
    assert len(pick_samples(tmp_path, n=500)) == 160
