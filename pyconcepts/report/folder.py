"""The report's folder: checked before any work, and changed only once the report is done.

A report is written into a hidden staging folder inside its destination
(``.pyconcepts-staging-*``), then moved into place file by file (each move is a rename within
one file system, the index last) under an exclusive lock on the folder, and the files of the
earlier report that this one did not write are deleted. So an interrupted run leaves the
previous report as it was (Ctrl-C and SIGTERM wait until those last renames are done), and
two runs on one folder end with one complete report, never a mix of their pictures. The folder
itself is never replaced: the user's own files and folders in it, its permissions, a mount or a
link are left as they are. A staging folder left by a killed run is deleted by the next run
(its lock is free once its process is gone, on any machine that shares the file system and its
locks).
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
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
            # under the folder's lock: another run must not take this staging folder for a
            # killed run's between its creation and its lock
            with _lock(self.root / _LOCK, blocking=True):
                self._remove_stale()
                self.path = pathlib.Path(tempfile.mkdtemp(prefix=_STAGING, dir=self.root))
                # held while this run lives: a later run takes a staging folder whose lock is
                # free for the leftover of a killed run
                self._held = _lock(self.path / _LOCK, blocking=True)
            # an earlier report's folders that the moves could not reach: said before any work
            try:
                self._check_targets(["index.html", "images/", "concepts/"])
            except OSError:
                self.discard()
                raise
        except PermissionError as exc:
            if exc.strerror is None:     # ours, already worded
                raise
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
        written = set(written) - {MANIFEST, _LOCK}
        # pictures first, then the stylesheet and the pages, the index last: a page never
        # links a picture that is not there yet
        order = sorted(written, key=lambda r: (r == "index.html", not r.startswith("images/"), r))
        with _lock(self.root / _LOCK, blocking=True), _signals_held():
            self._check_targets(order)
            previous = manifest_files(self.root)
            # every file either report may leave is listed while the moves run, so that a run
            # cut short among them is cleaned up by the next one
            _write_manifest(self.root, previous | written)
            try:
                for rel in order:
                    target = self.root / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(self.path / rel, target)
            except OSError as exc:
                raise OSError(f"the report in {str(self.root)!r} is incomplete: moving {rel!r} into place failed "
                              f"({exc.strerror or exc}); run it again once that is mended") from exc
            for rel in sorted(previous - written - {MANIFEST}):
                try:
                    (self.root / rel).unlink()
                except OSError:
                    pass
            _write_manifest(self.root, written)
        self.discard()

    def _check_targets(self, order: List[str]) -> None:
        """Every folder a file moves into is writable and on the staging folder's file system
        (else a rename fails half-way through), checked before the first move."""
        device = os.stat(self.path).st_dev
        for folder in sorted({os.path.dirname(rel) for rel in order}):
            target = self.root / folder
            if not target.exists():
                continue
            if not os.access(target, os.W_OK | os.X_OK):
                raise PermissionError(f"cannot move the report into {str(target)!r}: it is not writable "
                                      "(nothing was changed)")
            if os.stat(target).st_dev != device:
                raise OSError(f"cannot move the report into {str(target)!r}: it is on another file system than "
                              f"{str(self.root)!r} (a link or a mount; nothing was changed)")


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM held back while the report moves into place (where they would leave
    it half old, half new) and acted on at the end, as they would have been. Python handles
    signals in the main thread only: elsewhere nothing is held."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    before = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            before[sig] = signal.signal(sig, lambda number, frame: caught.append((number, frame)))
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        for number, frame in caught[:1]:
            handler = before.get(number)
            if callable(handler):
                handler(number, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(number)


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
