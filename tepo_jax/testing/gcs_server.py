"""`gcp-storage-emulator` as the tests start it: `python -m tepo_jax.testing.gcs_server PORT`.

One fix over the package as released: a media download carries the object's generation in
`x-goog-generation` (and `x-goog-metageneration`), as GCS does. tensorstore (orbax's array
writer) reads the generation of every object it reads from that header, and without it an
OCDBT checkpoint fails with "Malformed StorageGeneration" as soon as a manifest it reads back
exists. The handler is wrapped before the server module builds its route table from it.
"""
from __future__ import annotations

import sys

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
        obj = None
    if obj is not None:
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])
    return _download(request, response, storage, *args, **kwargs)


objects.download = download


def main(port: int) -> None:
    from gcp_storage_emulator.server import create_server  # after the patch: routes bind to it

    create_server("127.0.0.1", port, in_memory=True).run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
