"""A local GCS emulator for tests: `gcp-storage-emulator` (the GCS JSON API on 127.0.0.1, in
memory; gcs_server.py) in a subprocess, and the environment that points every GCS client of a
run at it.

    with GcsEmulator() as gcs:
        gcs.create_bucket("b")
        env = {**os.environ, **gcs.env}   # for subprocesses; gcs.apply() for this process

Clients and the variables that redirect them:
- gcsfs (etils.epath's backend for gs://, and fsspec's): `STORAGE_EMULATOR_HOST`. gcsfs'
  experimental zonal/HNS bucket detection asks the real control-plane API for each bucket's
  layout (and warns each time it cannot); `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` keeps it
  off, as the emulator has no such API.
- tensorstore (orbax's array data): `TENSORSTORE_GCS_HTTP_URL` and, since the emulator
  checks no credentials, `GOOGLE_AUTH_TOKEN_FOR_TESTING`.
- google-cloud-storage (tensorboardX's gs:// writer): `STORAGE_EMULATOR_HOST`, anonymous
  credentials, `GOOGLE_CLOUD_PROJECT`.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    def __init__(self, startup_timeout: float = 30.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._timeout = startup_timeout
        self._proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                "TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
                "GOOGLE_CLOUD_PROJECT": "emulator"}

    def start(self) -> "GcsEmulator":
        # The emulator with the generation header tensorstore needs (gcs_server.py).
        self._proc = subprocess.Popen([sys.executable, "-m", "tepo_jax.testing.gcs_server", str(self.port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env={**os.environ, "PYTHONPATH": _ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
        deadline = time.time() + self._timeout
        while True:
            try:
                urllib.request.urlopen(self.url + "/", timeout=1).read()
                return self
            except OSError:
                if self._proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"the GCS emulator did not start on {self.url}")
                time.sleep(0.1)

    def create_bucket(self, name: str) -> str:
        req = urllib.request.Request(f"{self.url}/storage/v1/b?project=emulator",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(req, timeout=10).read()
        return f"gs://{name}"

    def apply(self) -> dict[str, str | None]:
        """Point this process's clients at the emulator; returns the previous values."""
        old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        return old

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def __enter__(self) -> "GcsEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def forget_listings() -> None:
    """Drop fsspec's cached listings in this process, so that files another process wrote
    since are seen (gcsfs caches directory listings per filesystem instance)."""
    import fsspec

    fs = fsspec.filesystem("gs")
    fs.invalidate_cache()
