"""A real S3-compatible server (moto's server mode) on a free loopback port, for tests of URL sources and roots.

    def test_x(s3_server):
        url = s3_server.bucket("src")          # a fresh, empty bucket: "s3://src-<n>"
        s3_server.upload(local_folder, url)    # every file under the folder, keys relative to it

tests/conftest.py registers the fixture. It is session-scoped: one server for the whole run, started on first use, with the
standard environment pointing at it (`AWS_ENDPOINT_URL`, test credentials, `us-east-1`) so that
fsspec/s3fs, worker processes and subprocesses find it the way a user's run would find AWS.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.prefect_server import free_port

MOTO_SERVER = str(Path(sys.executable).with_name("moto_server"))


class S3Server:
    """A running `moto_server`; `env` is what a process needs to reach it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        self._names = itertools.count()
        self.proc = subprocess.Popen([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)

    def fs(self):
        """An s3fs filesystem on the server (fsspec's cached instance, the one tagdit's code gets too)."""
        from tagdit.stores import filesystem

        return filesystem("s3://x")[0]

    def bucket(self, prefix: str = "b") -> str:
        """A new empty bucket; returns its URL (`s3://<prefix>-<n>`)."""
        name = f"{prefix}-{os.getpid()}-{next(self._names)}"
        self.fs().mkdir(name)
        return f"s3://{name}"

    def upload(self, folder: Path, url: str) -> list[str]:
        """Put every file under `folder` at `url/<relative path>`; returns the relative paths."""
        fs, rels = self.fs(), []
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                rel = p.relative_to(folder).as_posix()
                fs.put_file(str(p), f"{url.removeprefix('s3://')}/{rel}")
                rels.append(rel)
        return rels


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server for the session, with the environment set to reach it."""
    server = S3Server()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in server.env.items():
            mp.setenv(k, v)
        yield server
    server.stop()
