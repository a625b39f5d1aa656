"""A folder at any fsspec URL (local path, s3://, gs://, memory://) with atomic writes.

Local: files are written in a staging folder beside the target and renamed into place.
Object stores: a PUT is atomic, so a file appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

STAGING = ".staging"


class Store:
    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._staging: str | None = None

    def child(self, name: str) -> "Store":
        return Store(f"{self.url}/{name}")

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _full(self, name: str) -> str:
        return f"{self.path}/{name}"

    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache(self.path)
        return self.fs.exists(self._full(name))

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self._full(name))

    def open(self, name: str, mode: str = "rb"):
        return self.fs.open(self._full(name), mode)

    def size(self, name: str) -> int:
        return self.fs.size(self._full(name))

    def remove(self, name: str) -> None:
        if self.exists(name):
            self.fs.rm_file(self._full(name))

    def staging_dir(self) -> str:
        """A local folder for files under construction; on local storage, beside the targets."""
        if self._staging is None:
            if self.is_local:
                self._staging = os.path.join(self.path, STAGING)
                os.makedirs(self._staging, exist_ok=True)
            else:
                self._staging = tempfile.mkdtemp(prefix="xgem-dist-staging-")
        return self._staging

    def clear_staging(self) -> None:
        """Drop leftovers of an interrupted run (never a finished file)."""
        if self.is_local:
            shutil.rmtree(os.path.join(self.path, STAGING), ignore_errors=True)
        elif self._staging:
            shutil.rmtree(self._staging, ignore_errors=True)
        self._staging = None

    def put(self, local_path: str, name: str) -> None:
        """Move a finished local file to `name` atomically."""
        if self.is_local:
            os.makedirs(self.path, exist_ok=True)
            os.replace(local_path, self._full(name))
        else:
            self.fs.put_file(local_path, self._full(name))
            os.remove(local_path)

    def write_bytes(self, name: str, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.staging_dir(), prefix=Path(name).name + ".")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are shared outputs
        self.put(tmp, name)


def write_json(path: str, obj) -> None:
    """`obj` as indented JSON at a local path or URL, written atomically (results of long runs)."""
    folder, name = os.path.split(path)
    store = Store(folder or ".")
    store.write_bytes(name, json.dumps(obj, indent=1).encode())
    if store.is_local:
        with contextlib.suppress(OSError):  # only if empty: another writer may be staging in the same folder
            os.rmdir(store.staging_dir())
    else:
        store.clear_staging()  # this store's own temporary folder
