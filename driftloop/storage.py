"""The artifact store: snapshots, quarantines, models and reports under one root, a
local directory or any fsspec URI (``s3://bucket/prefix``, ``gs://...``)."""

from __future__ import annotations

import io

import fsspec
import polars as pl

from driftloop.atomic import write_atomic

# Scoring outputs have their own commit protocol (driftloop.outputs); their reader is
# re-exported here, where callers have always found it.
from driftloop.outputs import is_local_fs, read_predictions

__all__ = ["ArtifactStore", "read_bytes", "read_parquet", "read_predictions"]


class ArtifactStore:
    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.fs, self._base = fsspec.core.url_to_fs(self.root)

    def uri(self, relpath: str) -> str:
        return f"{self.root}/{relpath.lstrip('/')}"

    def _path(self, relpath: str) -> str:
        return f"{self._base}/{relpath.lstrip('/')}"

    def exists(self, relpath: str) -> bool:
        return bool(self.fs.exists(self._path(relpath)))

    def path(self, relpath: str) -> str:
        """The path in the store's filesystem (``fs``) of ``relpath``."""
        return self._path(relpath)

    def remove(self, relpath: str) -> None:
        """Delete a file or a directory tree (retention; never used on lineage)."""
        if self.exists(relpath):
            self.fs.rm(self._path(relpath), recursive=True)

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write atomically: readers see the old object or the whole new one (one PUT on
        an object store, where a rename would be a copy and a delete)."""
        path = self._path(relpath)
        if not is_local_fs(self.fs):
            self.fs.pipe_file(path, data)
            return self.uri(relpath)
        write_atomic(path, data)  # durably: fsynced before the rename
        return self.uri(relpath)

    def write_parquet(self, relpath: str, frame: pl.DataFrame) -> str:
        buffer = io.BytesIO()
        frame.write_parquet(buffer, compression="zstd", statistics=True)
        return self.write_bytes(relpath, buffer.getvalue())

    def write_text(self, relpath: str, text: str) -> str:
        return self.write_bytes(relpath, text.encode("utf-8"))


def read_parquet(uri: str) -> pl.DataFrame:
    with fsspec.open(uri, "rb") as fh:
        return pl.read_parquet(fh)


def read_bytes(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as fh:
        return fh.read()
