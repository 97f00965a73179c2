"""The report's folder: checked before any work, and changed only once the report is done.

A report is written into a hidden staging folder inside its destination
(``.pyconcepts-staging-*``), then moved into place file by file (each move is a rename within
one file system, the index last) under an exclusive lock on the folder, and the files of the
earlier report that this one did not write are deleted. So an interrupted run leaves the
previous report as it was (unless it is cut within those last renames, milliseconds long), and
two runs on one folder end with one complete report, never a mix of their pictures. The folder
itself is never replaced: the user's own files and folders in it, its permissions, a mount or a
link are left as they are. A staging folder left by a killed run is deleted by the next run
(its lock is free once its process is gone, on any machine that shares the file system and its
locks).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Iterable, List, Optional, Set, Union

try:
    import fcntl
except ImportError:            # not POSIX: no locks (runs on one folder are not serialised)
    fcntl = None

MANIFEST = ".pyconcepts-report.json"
_STAGING = ".pyconcepts-staging-"
_LOCK = ".pyconcepts-report.lock"


def manifest_files(root: pathlib.Path) -> Set[str]:
    """Files listed by the report manifest in ``root`` (relative paths inside it); empty when
    there is none or it cannot be read."""
    try:
        with open(root / MANIFEST, encoding="utf-8") as handle:
            files = json.load(handle).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {rel for rel in files
            if isinstance(rel, str) and not os.path.isabs(rel) and ".." not in pathlib.PurePath(rel).parts}


def check_report_folder(out_dir: Union[str, os.PathLike], images_root: Optional[Union[str, os.PathLike]] = None,
                        name: str = "out_dir") -> pathlib.Path:
    """``out_dir`` as an absolute path, refused (ValueError naming ``name``) when it is a file,
    when it is a folder holding files of a report's names that no report wrote (someone else's
    ``index.html`` would be replaced), or when it lies inside ``images_root`` (the report's
    pictures would be read as images by the next run)."""
    root = pathlib.Path(os.path.abspath(out_dir))
    if root.exists() and not root.is_dir():
        raise ValueError(f"{name} {os.fspath(out_dir)!r} exists and is not a folder")
    if images_root is not None:
        inner, images = os.path.realpath(root), os.path.realpath(images_root)
        if inner == images or inner.startswith(images.rstrip(os.sep) + os.sep):
            raise ValueError(f"{name} {str(root)!r} lies inside the images folder {os.fspath(images_root)!r}: "
                             "the report's pictures would be read as images next time; write it elsewhere")
    if root.is_dir() and not (root / MANIFEST).is_file():
        clash = sorted(report_names(_files_under(root)))
        if clash:
            shown = ", ".join(clash[:3]) + (", ..." if len(clash) > 3 else "")
            raise ValueError(f"{name} {str(root)!r} holds files of a report's names that no pyconcepts report "
                             f"wrote there ({shown}); a report would replace them: give a new folder, or one an "
                             "earlier report wrote")
    return root


# what a report writes: its pages, its stylesheet and its pictures
_REPORT_NAME = re.compile(r"^(index\.html|report\.css|concepts/concept-\d+\.html|images/c\d+-[a-z]+-\d+\.png)$")


def report_names(files: Iterable[str]) -> Set[str]:
    """Those of ``files`` (relative paths) that a report could write."""
    return {rel for rel in files if _REPORT_NAME.match(pathlib.PurePath(rel).as_posix())}


def _files_under(root: pathlib.Path) -> List[str]:
    out = []
    for dirpath, _, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        out += [os.path.normpath(os.path.join(rel_dir, f)) for f in filenames]
    return out


def _lock(path: pathlib.Path, blocking: bool):
    """An open file holding an exclusive lock on ``path`` (created), or None when ``blocking``
    is False and another process holds it."""
    handle = open(path, "a+b")
    if fcntl is None:
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        return None
    return handle


class StagedFolder:
    """A staging folder inside ``root`` that ``commit`` moves into place; ``discard`` deletes it."""

    def __init__(self, root: pathlib.Path):
        self.root = pathlib.Path(os.path.abspath(root))
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_stale()
            self.path = pathlib.Path(tempfile.mkdtemp(prefix=_STAGING, dir=self.root))
            # held while this run lives: a later run takes a staging folder whose lock is free
            # for the leftover of a killed run
            self._held = _lock(self.path / _LOCK, blocking=True)
        except PermissionError as exc:
            raise PermissionError(f"cannot write the report into {str(self.root)!r}: {exc.strerror}") from exc

    def _remove_stale(self) -> None:
        for entry in os.listdir(self.root):
            if not entry.startswith(_STAGING) or not (self.root / entry).is_dir() or fcntl is None:
                continue
            held = _lock(self.root / entry / _LOCK, blocking=False)
            if held is not None:      # no live run holds it
                held.close()
                shutil.rmtree(self.root / entry, ignore_errors=True)

    def discard(self) -> None:
        self._held.close()
        shutil.rmtree(self.path, ignore_errors=True)

    def commit(self, written: Iterable[str]) -> None:
        """Move the written files into place (the index last), delete the earlier report's
        files that this one did not write, and record the new list in the manifest."""
        written = sorted(set(written) - {MANIFEST, _LOCK})
        with _lock(self.root / _LOCK, blocking=True):
            previous = manifest_files(self.root)
            # every file either report may leave is listed while the moves run, so that a run
            # cut short among them is cleaned up by the next one
            _write_manifest(self.root, previous | set(written))
            for rel in sorted(written, key=lambda r: r == "index.html"):
                target = self.root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.path / rel, target)
            for rel in sorted(previous - set(written) - {MANIFEST}):
                try:
                    (self.root / rel).unlink()
                except OSError:
                    pass
            _write_manifest(self.root, set(written))
        self.discard()


def _write_manifest(root: pathlib.Path, files: Set[str]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"files": sorted(files | {MANIFEST})}, handle, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, root / MANIFEST)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
