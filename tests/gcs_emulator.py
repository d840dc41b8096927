"""A local Cloud Storage server for the gs:// tests: `gcp-storage-emulator` (in memory), plus the two
parts of the GCS JSON API that it lacks and that tensorstore (Orbax's array writer) relies on:
- generation preconditions (`ifGenerationMatch`, `ifGenerationNotMatch`) on reads, uploads and deletes,
  which tensorstore uses for its read-modify-write of OCDBT manifests;
- the `x-goog-generation` header on downloads, which tensorstore reads to know what it read.
Both follow https://cloud.google.com/storage/docs/request-preconditions.

    python tests/gcs_emulator.py PORT BUCKET   # prints "ready" once it serves
"""

import sys
import threading
import time
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_lock = threading.RLock()  # a precondition check and the write it guards happen as one step


def _generation(storage, bucket: str, name: str) -> str:
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"  # GCS: generation 0 means "no live object"


def _failed(request, generation: str, read: bool) -> HTTPStatus | None:
    q = request.query
    if "ifGenerationMatch" in q and q["ifGenerationMatch"][0] != generation:
        return HTTPStatus.PRECONDITION_FAILED
    if "ifGenerationNotMatch" in q and q["ifGenerationNotMatch"][0] == generation:
        return HTTPStatus.NOT_MODIFIED if read else HTTPStatus.PRECONDITION_FAILED
    return None


def _guard(handler, read: bool, name_from_query: bool = False):
    def wrapped(request, response, storage, *args, **kwargs):
        bucket = request.params["bucket_name"]
        name = request.query.get("name", [None])[0] if name_from_query else request.params.get("object_id")
        with _lock:
            if name is not None:
                generation = _generation(storage, bucket, name)
                status = _failed(request, generation, read)
                if status is not None:
                    response.status = status
                    return None
                if read and generation != "0":
                    response["x-goog-generation"] = generation
            out = handler(request, response, storage, *args, **kwargs)
            if not read and name is not None:  # what tensorstore reads back after a write
                response["x-goog-generation"] = _generation(storage, bucket, name)
            return out

    return wrapped


def main() -> None:
    port, bucket = int(sys.argv[1]), sys.argv[2]
    objects.download = _guard(objects.download, read=True)
    objects.get = _guard(objects.get, read=True)
    objects.delete = _guard(objects.delete, read=False)
    objects.insert = _guard(objects.insert, read=False, name_from_query=True)
    from gcp_storage_emulator.server import create_server  # its routes take the handlers above

    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
