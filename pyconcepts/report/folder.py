"""The report's folder: checked before any work, written whole or not at all.

A report is written into a private staging folder beside its destination and swapped in at the
end (the old folder renamed aside, the new one renamed into place, the old one deleted). So an
interrupted run leaves the previous report as it was, and two runs writing the same folder end
with one of the two complete reports, never a mix of their pictures. Files in the destination
that no report wrote (the user's own) are carried over into the new folder as hard links
(copies where the file system has none), so they survive the swap.
"""
from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import shutil
import tempfile
import uuid
from typing import Iterable, List, Optional, Set, Union

MANIFEST = ".pyconcepts-report.json"
_TAG = ".pyconcepts-"


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
    """``out_dir`` as a path, refused (ValueError naming ``name``) when it is a file, when it is
    a folder holding files that no report wrote (a report replaces its folder's pictures and
    pages: someone else's ``index.html`` would be lost), or when it lies inside ``images_root``
    (the report's pictures would be read as images by the next run)."""
    root = pathlib.Path(os.path.abspath(out_dir))
    if root.exists() and not root.is_dir():
        raise ValueError(f"{name} {os.fspath(out_dir)!r} exists and is not a folder")
    here = os.path.realpath(os.getcwd())
    real = os.path.realpath(root)
    if here == real or here.startswith(real.rstrip(os.sep) + os.sep):
        # the finished report replaces the folder: a shell inside it would be left in a deleted one
        raise ValueError(f"{name} {os.fspath(out_dir)!r} is the working directory or holds it: the report replaces "
                         "its folder when it is done; give the folder's path from outside it")
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class StagedFolder:
    """A staging folder beside ``root``; ``commit`` swaps it in, ``discard`` deletes it."""

    def __init__(self, root: pathlib.Path):
        self.root = pathlib.Path(os.path.abspath(root))
        parent = self.root.parent
        self._prefix = f".{self.root.name}{_TAG}"
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._remove_stale(parent)
            self.path = pathlib.Path(tempfile.mkdtemp(prefix=f"{self._prefix}new-{os.getpid()}-", dir=parent))
        except PermissionError as exc:
            raise PermissionError(f"cannot write the report beside {str(self.root)!r}: {exc.strerror} in "
                                  f"{str(parent)!r} (the report is written there, then moved into place)") from exc
        os.chmod(self.path, 0o755)

    def _remove_stale(self, parent: pathlib.Path) -> None:
        """Staging and set-aside folders of runs on this machine that ended without cleaning
        up (killed): their process is gone."""
        for entry in os.listdir(parent):
            if not entry.startswith(self._prefix):
                continue
            parts = entry[len(self._prefix):].split("-")
            if len(parts) >= 3 and parts[0] in ("new", "old") and parts[1].isdigit() \
                    and not _pid_alive(int(parts[1])):
                shutil.rmtree(parent / entry, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def commit(self, written: Iterable[str], previous: Iterable[str]) -> None:
        """Carry the destination's other files over, then swap the staging folder in."""
        written, previous = set(written), set(previous)
        if self.root.is_dir():
            # a file of the same name that no report wrote would be lost (the check before the
            # work looks for every name a report writes; this is its last line)
            if not (self.root / MANIFEST).is_file():
                lost = sorted(written & set(_files_under(self.root)))
                if lost:
                    raise ValueError(f"{str(self.root)!r} holds files that no report wrote and this report "
                                     f"would replace ({', '.join(lost[:3])}); nothing was changed there")
            self._carry_over(written | previous)
        for _ in range(50):
            aside = self.root.parent / f"{self._prefix}old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(self.root, aside)
            except FileNotFoundError:
                aside = None
            try:
                os.rename(self.path, self.root)
                return
            except OSError as exc:
                # another run put its report in place between the two renames: set it aside too
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            finally:
                if aside is not None:
                    shutil.rmtree(aside, ignore_errors=True)
        raise OSError(f"could not move the report into {str(self.root)!r}: other runs keep writing it")

    def _carry_over(self, skip: Set[str]) -> None:
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel_dir = os.path.relpath(dirpath, self.root)
            for entry in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                rel = os.path.normpath(os.path.join(rel_dir, entry))
                if rel in skip or rel == MANIFEST or entry.startswith(".tmp-"):
                    continue
                src, dst = os.path.join(dirpath, entry), self.path / rel
                if dst.exists():
                    continue
                dst.parent.mkdir(parents=True, exist_ok=True)
                if os.path.islink(src):
                    os.symlink(os.readlink(src), dst)
                    continue
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
