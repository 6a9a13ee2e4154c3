"""An S3-compatible server on 127.0.0.1 for the tests (moto's server mode), and a bucket in it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_env(port: int, cache: Path) -> dict[str, str]:
    """The standard AWS environment pointing at the local server, and a store cache for working copies."""
    return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "TAGDIT_STORE_CACHE": str(cache)}


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A moto S3 server for the module; yields its environment (also set in os.environ meanwhile)."""
    moto = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if moto is None:
        pytest.skip("moto[server] is not installed")
    port = free_port()
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    env = s3_env(port, tmp_path_factory.mktemp("store-cache"))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.kill()
        proc.wait()


def new_bucket(env: dict[str, str]) -> str:
    """A fresh bucket on the server: its name."""
    import s3fs

    name = f"tagdit-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"]).mkdir(name)
    return name
