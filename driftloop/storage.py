"""The artifact store: snapshots, quarantines, models and reports under one root, a
local directory or any fsspec URI (``s3://bucket/prefix``, ``gs://...``)."""

from __future__ import annotations

import io
import uuid

import fsspec
import polars as pl


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
        """Write atomically: readers see the old object or the whole new one."""
        path = self._path(relpath)
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        with self.fs.open(tmp, "wb") as fh:
            fh.write(data)
        self.fs.mv(tmp, path)
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


def read_predictions(uri: str) -> pl.DataFrame:
    """All committed prediction parts of a scoring output directory."""
    from driftloop.errors import SourceError

    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(f"{path}/_SUCCESS"):
        raise SourceError(f"{uri} is not a committed scoring output (no _SUCCESS marker)")
    frames = []
    for part in sorted(fs.glob(f"{path}/part-*.parquet")):
        with fs.open(part, "rb") as fh:
            frames.append(pl.read_parquet(fh))
    return pl.concat(frames) if frames else pl.DataFrame()


def read_bytes(uri: str) -> bytes:
    with fsspec.open(uri, "rb") as fh:
        return fh.read()
