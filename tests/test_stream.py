"""The training stream: a global per-epoch sample order split over ranks and loader workers, exact resume, coverage."""

import io
import json
import logging
import tarfile

import pytest
import torch
import webdataset as wds
from webdataset.tariterators import tarfile_samples

from tagdit.train.epoch_order import piece
from tagdit.train.stream import EpochStream
from tagdit.train.tar_samples import tar_samples


def write_shards(root, sizes):
    """Shards of the given sizes; sample k holds x = k (unique over all shards)."""
    urls = []
    for s, n in enumerate(sizes):
        path = root / f"train-{s:06d}.tar"
        with wds.TarWriter(str(path), mtime=0) as w:
            for i in range(n):
                k = 100 * s + i
                w.write({"__key__": f"s{k:04d}", "json": json.dumps({"x": k}).encode()})
        urls.append(str(path))
    return urls


def decode(raw):
    """(x, the sample's augmentation seed)."""
    return torch.tensor([json.loads(raw["json"])["x"], raw["__seed__"]], dtype=torch.int64)


def drop_sevens(raw):
    example = decode(raw)
    return None if example[0] % 10 == 7 else example


def as_dict(raw):
    """A dict of tensors (they cross from a worker stacked), or None for every x ending in 7."""
    example = drop_sevens(raw)
    return None if example is None else {"x": example[:1], "seed": example[1]}


def with_name(raw):
    """A dict with a string (it crosses from a worker example by example)."""
    example = as_dict(raw)
    return None if example is None else {**example, "name": raw["__key__"]}


def stream(urls, rank=0, world=1, workers=0, batch=3, fn=decode):
    return EpochStream(urls, fn, batch_size=batch, seed=3, shuffle_buffer=4, rank=rank, world_size=world,
                       workers=workers)


def take(s, n):
    it = iter(s)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def by_epoch(s, epochs):
    """{epoch: [(x, seed), ...]} of a batch-size-1 stream, read until `epochs` epochs are complete."""
    seen: dict[int, list[tuple[int, int]]] = {}
    it = iter(s)
    while True:
        x, seed = next(it)[0].tolist()
        epoch = s.state_dict()["epoch"]
        if epoch == epochs:
            it.close()
            return seen
        seen.setdefault(epoch, []).append((x, seed))


SIZES = [5, 7, 6, 4, 8, 3]  # uneven shards: workers and ranks run out at different times


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_resuming_mid_epoch_gives_the_uninterrupted_batches(tmp_path, workers, world):
    urls = write_shards(tmp_path, SIZES)
    states = []
    for rank in range(world):
        first = stream(urls, rank, world, workers, fn=drop_sevens)
        take(first, 2)
        states.append(first.state_dict())
    for rank in range(world):
        straight = take(stream(urls, rank, world, workers, fn=drop_sevens), 14)  # > 1 epoch on every rank
        resumed = stream(urls, rank, world, workers, fn=drop_sevens)
        resumed.load_state_dict(states)
        assert states[rank]["epoch"] == 0 and sum(states[rank]["consumed"]) < sum(SIZES) // world
        rest = take(resumed, 12)
        assert all(torch.equal(a, b) for a, b in zip(straight[2:], rest, strict=True))


@pytest.mark.parametrize("fn", [decode, drop_sevens, as_dict, with_name])
def test_zero_and_one_worker_give_the_same_batches(tmp_path, fn):
    urls = write_shards(tmp_path, SIZES)
    inline, process = take(stream(urls, workers=0, fn=fn), 12), take(stream(urls, workers=1, fn=fn), 12)
    if fn is with_name:
        assert [b["name"] for b in inline] == [b["name"] for b in process]
    if isinstance(inline[0], dict):
        inline, process = [b["x"] for b in inline], [b["x"] for b in process]
    assert all(torch.equal(a, b) for a, b in zip(inline, process, strict=True))


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (1, 2), (2, 1), (2, 2), (4, 2)])
def test_every_sample_is_seen_once_per_epoch_over_all_ranks_and_workers(tmp_path, world, workers):
    urls = write_shards(tmp_path, SIZES)  # (4, 2): 8 slots > 6 shards, the per-sample fallback
    everything = sorted(100 * s + i for s, n in enumerate(SIZES) for i in range(n))
    epochs = [by_epoch(stream(urls, r, world, workers, batch=1), 2) for r in range(world)]
    for e in range(2):
        seen = sorted(x for ranks in epochs for x, _ in ranks[e])
        assert seen == everything
    assert [x for x, _ in epochs[0][0]] != [x for x, _ in epochs[0][1]]  # reshuffled each epoch


def test_ranks_read_about_their_share_of_the_samples(tmp_path, monkeypatch):
    """A rank reads the samples of its contiguous piece of the order and no others, from a few shards."""
    import tagdit.train.tar_samples as ts

    urls = write_shards(tmp_path, SIZES)
    reads = []
    real = ts.TarShard._read
    monkeypatch.setattr(ts.TarShard, "_read", lambda self, key, members: reads.append(key) or real(self, key, members))
    order = stream(urls).order
    for r in range(3):
        reads.clear()
        got = [raw["__key__"] for raw in order.samples(0, piece([(0, order.n)], r, 3))]
        assert sorted(reads) == sorted(got) and len(got) == sum(SIZES) // 3  # no sample read that the rank does not use
        assert len({k[:3] for k in reads}) <= 3  # from a few neighbouring shards


def read_tagged(s, until_epoch=None, n=None):
    """[(epoch, x)] of a batch-size-1 stream: `n` samples, or all until epoch `until_epoch` begins."""
    out, it = [], iter(s)
    while n is None or len(out) < n:
        x = next(it)[0][0].item()
        epoch = s.state_dict()["epoch"]
        if epoch == until_epoch:
            break
        out.append((epoch, x))
    it.close()
    return out


@pytest.mark.parametrize(("read", "workers"), [((5, 6), (2, 1)), ((18, 3), (1, 2)), ((0, 33), (2, 0))])
def test_an_epoch_resumed_on_three_ranks_reads_each_sample_once(tmp_path, read, workers):
    """2 ranks read some samples (one maybe into the next epoch), 3 ranks resume: each epoch covers the data once."""
    urls = write_shards(tmp_path, SIZES)
    before = [stream(urls, r, 2, workers[0], batch=1) for r in range(2)]
    seen = [t for s, n in zip(before, read, strict=True) for t in read_tagged(s, n=n)]
    states = [s.state_dict() for s in before]
    for r in range(3):
        after = stream(urls, r, 3, workers[1], batch=1)
        after.load_state_dict(states)
        seen += read_tagged(after, until_epoch=2)
    everything = sorted(100 * s + i for s, n in enumerate(SIZES) for i in range(n))
    assert sorted(x for e, x in seen if e == 0) == everything
    assert sorted(x for e, x in seen if e == 1) == everything


def test_the_epoch_order_does_not_depend_on_the_split(tmp_path):
    urls = write_shards(tmp_path, SIZES)
    order = stream(urls).order
    whole = [raw["__key__"] for raw in order.samples(1, [(0, order.n)])]
    pieces = [raw["__key__"] for k in range(3) for raw in order.samples(1, piece([(0, order.n)], k, 3))]
    assert pieces == whole and sorted(whole) == sorted(f"s{100 * s + i:04d}" for s, n in enumerate(SIZES) for i in range(n))
    assert whole != [raw["__key__"] for raw in order.samples(0, [(0, order.n)])]  # another epoch, another order


def test_too_few_samples_for_the_slots_is_a_clear_error(tmp_path):
    urls = write_shards(tmp_path, [2, 1])
    with pytest.raises(ValueError, match="3 training samples for 4 loader slots.*train.loader_workers"):
        stream(urls, 0, 2, 2)


def test_a_state_of_another_order_restarts_its_epoch(tmp_path, caplog):
    urls = write_shards(tmp_path, SIZES)
    s = stream(urls, workers=2)
    with caplog.at_level(logging.WARNING):
        s.load_state_dict([{"epoch": 3, "consumed": 7}])  # the old per-sample format
    assert {k: v for k, v in s.state_dict().items() if k in ("epoch", "consumed", "next")} == {
        "epoch": 3, "consumed": [0, 0], "next": 0}
    assert "restarts" in caplog.text


def test_a_decode_error_in_a_worker_reaches_the_consumer(tmp_path):
    urls = write_shards(tmp_path, SIZES)

    def broken(raw):
        raise ValueError("bad sample")

    with pytest.raises(RuntimeError, match="bad sample"):
        take(stream(urls, workers=1, fn=broken), 1)


def test_tar_samples_match_webdataset(tmp_path):
    path = tmp_path / "tricky.tar"
    members = [("d/" + "x" * 150 + ".JSON", b"1"), ("d/" + "x" * 150 + ".cls", b"2"), ("__meta__", b"m"),
               ("a.b.c", b"3"), ("a.d", b"4"), ("\u00fc/k.txt", b"5"), ("z" * 90 + "/" + "w" * 60 + ".txt", b"6")]
    for fmt, name in [(tarfile.GNU_FORMAT, "gnu"), (tarfile.PAX_FORMAT, "pax")]:
        path = tmp_path / f"{name}.tar"
        with tarfile.open(path, "w", format=fmt) as t:
            for member, data in members:
                info = tarfile.TarInfo(member)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            info = tarfile.TarInfo("dir")
            info.type = tarfile.DIRTYPE
            t.addfile(info)
        ours = list(tar_samples(str(path)))
        assert ours == list(tarfile_samples([{"url": str(path)}]))
        assert [s["__key__"] for s in ours] == ["d/" + "x" * 150, "a", "\u00fc/k", "z" * 90 + "/" + "w" * 60]


def _endless():
    while True:
        yield torch.zeros(16)


def test_a_loader_worker_stops_at_once_under_the_parents_sigterm_handler():
    """A Prefect flow run raises on SIGTERM; its forked loader workers must still end when closed."""
    import signal
    import time

    from tagdit.train.loader_workers import WorkerProcess

    def raising(signum, frame):
        raise RuntimeError("terminated")

    old = signal.signal(signal.SIGTERM, raising)
    try:
        worker = WorkerProcess(_endless, ())
        next(worker)
        time.sleep(0.5)  # its queue fills up
        start = time.monotonic()
        worker.close()
        assert time.monotonic() - start < 2 and not worker.proc.is_alive()
    finally:
        signal.signal(signal.SIGTERM, old)
