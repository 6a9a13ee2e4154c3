"""Shared fixtures: offline Prefect, one-thread torch, and the tiny datasets several test modules use.

Every test runs offline with its own Prefect database and result storage. Fixture data is written
once per session by the helpers in tests/*_fixture*.py; tests must not change the files it wrote.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import pytest  # noqa: E402

from tagdit.demo.stand_in_taggers import build_wd_model  # noqa: E402
from tests.s3_server import s3_server  # noqa: E402,F401  (one moto S3 server for the session)
from tests.shard_fixtures import write_image_shards  # noqa: E402
from tests.wd_fixture import make_corpus  # noqa: E402


@pytest.fixture(scope="session")
def prefect_session(tmp_path_factory):
    """One temporary Prefect server/database for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):  # first start migrates a fresh DB
        yield


@pytest.fixture
def prefect_env(prefect_session, tmp_path, monkeypatch):
    """Prefect with result storage private to this test (the harness shares it otherwise)."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: str(tmp_path / "prefect-results")}):
        yield tmp_path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread: tiny models gain nothing from more, and lose a lot on shared cores.

    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`; module scope so its
    module-scoped fixtures (small trainings) run single-threaded too.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """Tiny image shards: 14 train + 4 val 32 px images, 5 per shard (ragged last shards), vocab.json."""
    return write_image_shards(tmp_path_factory.mktemp("shards") / "fx", n_train=14, n_val=4, size=32, per_shard=5)


@pytest.fixture(scope="session")
def wd_model(tmp_path_factory) -> Path:
    """A folder holding the tiny WD-interface tagger whose tags follow the image colour."""
    return build_wd_model(tmp_path_factory.mktemp("wd"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The messy source folder: GOOD readable images of every kind, BAD broken ones, non-images."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def world(corpus, wd_model) -> tuple[Path, Path]:
    """(source folder, tagger folder): the inputs of the crop -> tag -> shard stages."""
    return corpus, wd_model


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The config of a drawable run: a tiny DiT trained a few CPU steps, an untrained f = 8 VAE (64 px)."""
    from tests.run_fixtures import write_tiny_run

    return write_tiny_run(tmp_path_factory.mktemp("run"))


# `make test` runs the float-sensitive tests a second time under another instruction set (README:
# Two commands): every test of these small modules of float maths, and elsewhere the tests marked
# `@pytest.mark.numerics` one by one (floats compared: gradients, resumed weights, samples). Tests
# of plumbing (files, records, spawning, caching) run once.
NUMERICS_MODULES = {
    "test_dit", "test_vae", "test_vae_loss", "test_sampling", "test_interpolate", "test_img2img", "test_kid",
    "test_formats", "test_caffe_vgg",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in NUMERICS_MODULES:
            item.add_marker(pytest.mark.numerics)
