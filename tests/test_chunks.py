"""Crop and tag chunks and the dataset tables: written and read back by their one format module."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tagdit.formats.chunks import (
    read_crop_chunk,
    read_tag_chunk,
    tag_chunk_rows,
    write_crop_chunk,
    write_tag_chunk,
)
from tagdit.formats.dataset_tables import (
    manifest_writer,
    merge_manifests,
    read_manifest,
    read_rejects,
    read_tag_table,
    write_rejects,
    write_tag_table,
)

CROPPED = {"key": "a-1", "source": "a.png", "stamp": "a.png:4:1:None:", "ok": True, "reason": None, "sha256": "ab", "orig_size": [40, 30],
           "crop_box": [5, 0, 35, 30], "image": b"\x89PNG", "sidecar": "smile"}
REJECTED = {"key": "b-2", "source": "b.svg", "stamp": "b.svg:9:1:None:", "ok": False, "reason": "not a raster image", "sha256": None,
            "orig_size": None, "crop_box": None, "image": None, "sidecar": None}
TAGGED = {"key": "a-1", "input": "cd", "tags": ["smile", "red"], "scores": [1.0, 0.5], "categories": [0, 0], "rating": "general"}


def test_a_written_crop_chunk_reads_back_whole_by_columns_and_cropped_only(tmp_path):
    write_crop_chunk([CROPPED, REJECTED], tmp_path / "c.parquet")
    assert read_crop_chunk(tmp_path / "c.parquet").to_pylist() == [CROPPED, REJECTED]
    assert read_crop_chunk(tmp_path / "c.parquet", ["source"]).to_pylist() == [{"source": "a.png"}, {"source": "b.svg"}]
    ok = read_crop_chunk(tmp_path / "c.parquet", ["key"], ok_only=True).to_pylist()
    assert ok == [{"ok": True, "key": "a-1"}]
    assert not list(tmp_path.glob(".*tmp-*"))


def test_a_written_tag_chunk_reads_back_with_its_row_count(tmp_path):
    write_tag_chunk([TAGGED], tmp_path / "t.parquet")
    assert read_tag_chunk(tmp_path / "t.parquet").to_pylist() == [TAGGED]
    assert tag_chunk_rows(tmp_path / "t.parquet") == 1


def test_a_chunk_with_another_schema_is_refused_by_name(tmp_path):
    write_tag_chunk([TAGGED], tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t\.parquet is not a crop chunk"):
        read_crop_chunk(tmp_path / "t.parquet")
    write_crop_chunk([CROPPED], tmp_path / "c.parquet")
    with pytest.raises(ValueError, match=r"c\.parquet is not a tag chunk"):
        read_tag_chunk(tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="is not a tag chunk"):
        tag_chunk_rows(tmp_path / "c.parquet")
    pq.write_table(pa.table({"key": ["a-1"], "tags": [["smile"]]}), tmp_path / "old.parquet")  # a column short
    with pytest.raises(ValueError, match="is not a tag chunk"):
        read_tag_chunk(tmp_path / "old.parquet")


def test_dataset_tables_round_trip(tmp_path):
    for part in ("a", "b"):  # a unit's part each, merged in order
        with manifest_writer(tmp_path / f"{part}.parquet") as m:
            m.add({**CROPPED, **TAGGED, "key": f"{part}-1", "split": "train", "shard": "train-000000.tar"})
    assert merge_manifests([tmp_path / "b.parquet", tmp_path / "a.parquet"], tmp_path) == 2
    [row, _] = read_manifest(tmp_path)
    assert row["key"] == "b-1"
    assert row["split"] == "train" and row["tags"] == ["smile", "red"] and "image" not in row
    assert read_manifest(tmp_path, ["key"]) == [{"key": "b-1"}, {"key": "a-1"}]
    write_rejects(tmp_path, [pa.Table.from_pylist([REJECTED])], "crop")
    assert read_rejects(tmp_path) == [{"path": "b.svg", "stage": "crop", "reason": "not a raster image"}]
    write_tag_table(tmp_path, [("smile", 0, 2, 1, 1.5)])
    assert read_tag_table(tmp_path) == [{"tag": "smile", "category": 0, "count": 2, "train_count": 1,
                                         "mean_score": 0.75}]


def test_merged_tables_gather_small_parts_into_few_row_groups(tmp_path, monkeypatch):
    import tagdit.formats.dataset_tables as dt

    monkeypatch.setattr(dt, "TABLE_ROW_GROUP", 16)
    parts = [pa.Table.from_pylist([{**REJECTED, "source": f"{i}-{j}.svg"} for j in range(3)]) for i in range(40)]
    assert write_rejects(tmp_path, parts, "crop") == 120
    meta = pq.read_metadata(tmp_path / dt.REJECTS)
    assert meta.num_row_groups == 8 and meta.num_rows == 120  # not one group per part (each kept in the footer)
    assert [r["path"] for r in read_rejects(tmp_path)][:4] == ["0-0.svg", "0-1.svg", "0-2.svg", "1-0.svg"]
