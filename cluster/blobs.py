"""Where file bytes live: a local directory by default, any fsspec URL (``s3://bucket/prefix``)
on a cluster. Records about the files (owner, size, purpose) are in the store; this holds bytes
only, under the file's id.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def default_blob_url() -> str:
    return str(Path(tempfile.gettempdir()) / "ember-blobs")


class BlobStore:
    """Bytes by name under one fsspec URL (a plain path is a local directory)."""

    def __init__(self, url: str | None = None) -> None:
        import fsspec

        self.url = (url or default_blob_url()).rstrip("/")
        self._fs, self._root = fsspec.core.url_to_fs(self.url)
        self._fs.makedirs(self._root, exist_ok=True)

    def _path(self, name: str) -> str:
        if "/" in name or name.startswith("."):
            raise ValueError(f"bad blob name {name!r}")
        return f"{self._root}/{name}"

    def put(self, name: str, data: bytes) -> None:
        """Write all of ``data`` under ``name``; a reader never sees a partial file (a local
        directory gets a temporary name first, then a rename)."""
        path = self._path(name)
        tmp = path + ".part"
        with self._fs.open(tmp, "wb") as f:
            f.write(data)
        self._fs.mv(tmp, path)

    def get(self, name: str) -> bytes:
        with self._fs.open(self._path(name), "rb") as f:
            return f.read()

    def delete(self, name: str) -> None:
        path = self._path(name)
        if self._fs.exists(path):
            self._fs.rm(path)
