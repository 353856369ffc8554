"""Files and Python objects saved with a run (``Run.save`` and friends).

Every process of a run may save artifacts; see ``docs/artifacts.md``.  The call checks its
arguments, serialises an object, and hands the content to a background thread
(``transport/transfer.py``): it never waits for the copy or the transfer.  ``Run.flush`` and
``Run.close`` wait for it.

Objects are stored in documented, restorable formats (``deserialize`` reads them back):

=========================================  ===========================================
``numpy.ndarray``                          ``.npy`` bytes (``numpy.save``, no pickle),
                                           ``application/vnd.simvue.numpy.v1``
``pandas.DataFrame``                       CSV with the index as first column
                                           (``DataFrame.to_csv``),
                                           ``application/vnd.simvue.df.v1``
``dict``, ``list`` (JSON-serialisable)     UTF-8 JSON, ``application/json``
anything else, with ``allow_pickle=True``  ``pickle.dumps``, ``application/octet-stream``
=========================================  ===========================================
"""

from __future__ import annotations

import io
import json
import mimetypes
import os
import pickle
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from . import validation
from ._run_parts import RunParts
from .errors import SimvueError, SimvueRunError, SimvueValueError
from .transport.transfer import ArtifactJob

CATEGORIES = ("code", "input", "output")
NUMPY_MIME = "application/vnd.simvue.numpy.v1"
DATAFRAME_MIME = "application/vnd.simvue.df.v1"
JSON_MIME = "application/json"
PICKLE_MIME = "application/octet-stream"
DEFAULT_FILE_MIME = "application/octet-stream"


def serialize(obj: Any, allow_pickle: bool = False) -> tuple[bytes, str]:
    """``(content, mime_type)`` of an object, in the formats the module docstring lists.

    Raises ``SimvueValueError`` for an object with no safe format unless ``allow_pickle``."""
    cls = type(obj)
    module = cls.__module__ or ""
    if module.startswith("numpy") and cls.__name__ == "ndarray":
        import numpy

        out = io.BytesIO()
        try:
            numpy.save(out, obj, allow_pickle=False)
        except ValueError:  # an object array: only pickle can hold it
            if not allow_pickle:
                raise SimvueValueError("this numpy array holds Python objects; pass allow_pickle=True to save it") from None
            return pickle.dumps(obj), PICKLE_MIME
        return out.getvalue(), NUMPY_MIME
    if module.startswith("pandas") and cls.__name__ == "DataFrame":
        return obj.to_csv().encode("utf-8"), DATAFRAME_MIME
    if isinstance(obj, (dict, list)):
        try:
            return json.dumps(obj, allow_nan=True).encode("utf-8"), JSON_MIME
        except (TypeError, ValueError):
            if not allow_pickle:
                raise SimvueValueError(
                    f"this {cls.__name__} is not JSON-serialisable; pass allow_pickle=True to save it with pickle"
                ) from None
    if not allow_pickle:
        raise SimvueValueError(
            f"objects of type {cls.__name__} are saved with pickle only on request: pass allow_pickle=True"
            " (or save a numpy array, a pandas DataFrame, a dict or a list)"
        )
    try:
        return pickle.dumps(obj), PICKLE_MIME
    except Exception as exc:  # noqa: BLE001 - pickling can fail in many ways
        raise SimvueValueError(f"could not pickle this {cls.__name__}: {exc}") from None


def deserialize(data: bytes, mime_type: str, allow_pickle: bool = False) -> Any:
    """The object an artifact's content holds (the inverse of ``serialize``).

    Pickled content (``application/octet-stream``) is only unpickled with ``allow_pickle``:
    unpickling runs code, so only do it for content you trust.  Any other type comes back as
    the bytes themselves."""
    if mime_type == NUMPY_MIME:
        import numpy

        return numpy.load(io.BytesIO(data), allow_pickle=False)
    if mime_type == DATAFRAME_MIME:
        import pandas

        return pandas.read_csv(io.BytesIO(data), index_col=0)
    if mime_type == JSON_MIME:
        return json.loads(data.decode("utf-8"))
    if mime_type == PICKLE_MIME and allow_pickle:
        return pickle.loads(data)
    return data


def _category(value: Any) -> str:
    if value not in CATEGORIES:
        raise SimvueValueError(f"artifact category must be one of {', '.join(CATEGORIES)}, not {value!r}")
    return value


def _artifact_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SimvueValueError(f"an artifact name must be a non-empty string, not {value!r}")
    return value


class ArtifactsMixin(RunParts):
    """The artifact methods of ``Run``."""

    # -- the upstream 2.x names -----------------------------------------------------------

    def save_file(
        self,
        file_path: str | os.PathLike,
        category: str,
        file_type: str | None = None,
        preserve_path_relative_to: str | os.PathLike | None = None,
        name: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Save a file as an artifact of the run.

        ``category`` is ``code``, ``input`` or ``output``.  The artifact is named ``name``,
        else the file's path relative to ``preserve_path_relative_to``, else its base name;
        in a job of several processes the name gets the process's prefix (``rank1/``,
        ``worker0/``).  ``file_type`` is the MIME type (guessed from the name if not given).
        The content is copied (or, from another process, sent) in the background; the file
        should not change until ``flush()`` or ``close()`` returns."""
        try:
            job = self._file_job(file_path, category, file_type, name, metadata, relative_to=preserve_path_relative_to)
        except SimvueError as exc:
            return self._fail("save_file", exc)
        return self._save_job(job, "save_file")

    def save_object(
        self,
        obj: Any,
        category: str,
        name: str | None = None,
        allow_pickle: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Save a Python object as an artifact named ``name`` (required); see the module
        docstring for the formats, and ``simvue.artifacts.deserialize`` to read it back."""
        try:
            job = self._object_job(obj, category, name, allow_pickle, metadata)
        except SimvueError as exc:
            return self._fail("save_object", exc)
        return self._save_job(job, "save_object")

    # -- the 1.x names --------------------------------------------------------------------

    def save(
        self,
        filename: Any,
        category: str,
        filetype: str | None = None,
        preserve_path: bool = False,
        name: str | None = None,
        allow_pickle: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> bool:
        """Save a file (``filename`` is a path) or a Python object (then ``name`` is
        required) as an artifact.  With ``preserve_path`` a file's artifact name is the path
        as given rather than its base name."""
        try:
            if isinstance(filename, (str, os.PathLike)):
                job = self._file_job(filename, category, filetype, name, metadata, keep_path=preserve_path)
            else:
                job = self._object_job(filename, category, name, allow_pickle, metadata)
        except SimvueError as exc:
            return self._fail("save", exc)
        return self._save_job(job, "save")

    def save_directory(
        self, directory: str | os.PathLike, category: str, filetype: str | None = None, preserve_path: bool = False
    ) -> bool:
        """Save every file under ``directory`` (recursively), each named
        ``<directory's name>/<path inside it>`` (or the full path as given, with
        ``preserve_path``)."""
        try:
            jobs = self._directory_jobs(directory, category, filetype, preserve_path)
        except SimvueError as exc:
            return self._fail("save_directory", exc)
        return all([self._save_job(job, "save_directory") for job in jobs])

    def save_all(
        self,
        items: Iterable[str | os.PathLike],
        category: str,
        filetype: str | None = None,
        preserve_path: bool = False,
    ) -> bool:
        """Save each file or directory in ``items`` (as ``save`` / ``save_directory``)."""
        try:
            if isinstance(items, (str, os.PathLike)):
                raise SimvueValueError("save_all() needs a list of paths; use save() for one file")
            jobs: list[ArtifactJob] = []
            for item in items:
                if isinstance(item, (str, os.PathLike)) and os.path.isdir(item):
                    jobs.extend(self._directory_jobs(item, category, filetype, preserve_path))
                else:
                    jobs.append(self._file_job(item, category, filetype, None, None, keep_path=preserve_path))
        except SimvueError as exc:
            return self._fail("save_all", exc)
        return all([self._save_job(job, "save_all") for job in jobs])

    # -- building jobs --------------------------------------------------------------------

    def _file_job(
        self,
        file_path: Any,
        category: str,
        mime_type: str | None,
        name: str | None,
        metadata: Mapping[str, Any] | None,
        *,
        keep_path: bool = False,
        relative_to: Any = None,
    ) -> ArtifactJob:
        category = _category(category)
        if not isinstance(file_path, (str, os.PathLike)):
            raise SimvueValueError(f"a file path must be a str or path, not {type(file_path).__name__}")
        path = os.fspath(file_path)
        if not os.path.exists(path):
            raise SimvueValueError(f"cannot save {path!r}: no such file")
        if not os.path.isfile(path):
            raise SimvueValueError(f"cannot save {path!r}: not a regular file (use save_directory for a directory)")
        if not os.access(path, os.R_OK):
            raise SimvueValueError(f"cannot save {path!r}: not readable")
        if name is None:
            if relative_to is not None:
                name = os.path.relpath(os.path.abspath(path), os.path.abspath(os.fspath(relative_to)))
            elif keep_path:
                name = os.path.normpath(path)
            else:
                name = os.path.basename(path)
            name = name.replace(os.sep, "/")
        return ArtifactJob(
            info=self._artifact_info(
                _artifact_name(name), category, mime_type or mimetypes.guess_type(path)[0] or DEFAULT_FILE_MIME,
                os.path.abspath(path), metadata,
            ),
            path=path,
        )

    def _object_job(
        self, obj: Any, category: str, name: str | None, allow_pickle: bool, metadata: Mapping[str, Any] | None
    ) -> ArtifactJob:
        category = _category(category)
        if name is None:
            raise SimvueValueError("saving a Python object needs a name= for the artifact")
        name = _artifact_name(name)
        data, mime_type = serialize(obj, allow_pickle=bool(allow_pickle))
        return ArtifactJob(info=self._artifact_info(name, category, mime_type, None, metadata), data=data)

    def _directory_jobs(
        self, directory: Any, category: str, mime_type: str | None, preserve_path: bool
    ) -> list[ArtifactJob]:
        _category(category)
        if not isinstance(directory, (str, os.PathLike)) or not os.path.isdir(directory):
            raise SimvueValueError(f"cannot save directory {directory!r}: no such directory")
        root = Path(directory)
        base = os.path.normpath(os.fspath(root)) if preserve_path else (root.resolve().name or "directory")
        jobs = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            name = f"{base}/{path.relative_to(root).as_posix()}"
            jobs.append(self._file_job(path, category, mime_type, name.replace(os.sep, "/"), None))
        return jobs

    def _artifact_info(
        self, name: str, category: str, mime_type: str, original_path: str | None, metadata: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        if not isinstance(mime_type, str) or not mime_type:
            raise SimvueValueError(f"a file type must be a MIME type string, not {mime_type!r}")
        return {
            "name": name,
            "category": category,
            "mime_type": mime_type,
            "original_path": original_path,
            "metadata": validation.metadata(metadata) if metadata is not None else {},
            "created": time.time(),
        }

    def _save_job(self, job: ArtifactJob, call: str) -> bool:
        buffer = self._buffer
        if buffer is None:
            buffer = self._process_buffer(call)
            if buffer is None:
                return self._state == "disabled"
        if self._pipe is None or not self._pipe.save_artifact(job):  # a buffer comes with its pipe
            return self._fail(
                call, SimvueRunError(f"artifact {job.info['name']!r} not saved: this process has no aggregator to send it to")
            )
        return True
