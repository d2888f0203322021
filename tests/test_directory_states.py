"""Atomic writes into a location, generated: a state machine writes, plants and kills over
one folder, on each way a file takes its name (an unnamed file linked in, a temporary file
renamed), against a model of what the folder must hold.

What it holds at every step: each name the store wrote has exactly its latest bytes, as a
regular file with the umask's mode; whatever was planted and not written over is as it
was (a link still points where it did, and its target is never written); a name holding
a directory refuses the write and keeps the directory; no temporary file is ever left,
even by a write interrupted before the file had its name.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from friendli_image._store import Directory

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="links and modes are POSIX")

NAMES = st.sampled_from(["a.jpg", "b.png", "c.webp", "d.jpg"])
CONTENTS = st.binary(min_size=0, max_size=3000)
_PRECIOUS = b"precious, outside the location\n"


class _Died(BaseException):
    """The writing process dying mid-write: nothing after it runs."""


class DirectoryWrites(RuleBasedStateMachine):
    """One location folder, one file outside it, and the model of each name's content."""

    unnamed = True

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="friendli-dir-states-"))
        self.out = self.root / "out"
        self.out.mkdir()
        self.outside = self.root / "outside.bin"
        self.outside.write_bytes(_PRECIOUS)
        self.previous_umask = os.umask(0o027)
        self.patch = pytest.MonkeyPatch()
        if not self.unnamed:
            self.patch.setattr("friendli_image._store._TMPFILE", 0)
        self.folder = Directory(self.out)
        #: name -> ("file", bytes) | ("link", target) | ("dir", None)
        self.model: dict[str, tuple[str, Any]] = {}
        self.written: set[str] = set()

    def teardown(self) -> None:
        self.folder.close()
        self.patch.undo()
        os.umask(self.previous_umask)
        shutil.rmtree(self.root, ignore_errors=True)

    @rule(name=NAMES, data=CONTENTS)
    def write(self, name: str, data: bytes) -> None:
        kind = self.model.get(name, ("file", b""))[0]
        if kind == "dir":
            with pytest.raises(IsADirectoryError):
                self.folder.write_atomic(name, data)
            return
        mtime = self.folder.write_atomic(name, data)
        assert (self.out / name).lstat().st_mtime_ns == mtime
        self.model[name] = ("file", data)
        self.written.add(name)

    @rule(name=NAMES, data=CONTENTS)
    def write_pieces(self, name: str, data: bytes) -> None:
        """A listing written as it is made (an iterable of pieces)."""
        if self.model.get(name, ("file", b""))[0] == "dir":
            return
        pieces = [data[i : i + 700] for i in range(0, len(data), 700)]
        self.folder.write_atomic(name, iter(pieces))
        self.model[name] = ("file", data)
        self.written.add(name)

    @rule(name=NAMES, data=CONTENTS)
    def interrupted_while_naming(self, name: str, data: bytes) -> None:
        """The write is interrupted (Ctrl-C, a cancel) after its bytes are out but before
        the file has its name: the name keeps what it held, and nothing else appears."""
        if self.model.get(name, ("file", b""))[0] == "dir":
            return

        def dies(*_args: object, **_kwargs: object) -> None:
            raise _Died

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("friendli_image._store.os.link", dies)
            patch.setattr("friendli_image._store.os.replace", dies)
            with pytest.raises(_Died):
                self.folder.write_atomic(name, data)

    @rule(name=NAMES)
    def plant_link(self, name: str) -> None:
        self._clear(name)
        (self.out / name).symlink_to(self.outside)
        self.model[name] = ("link", str(self.outside))

    @rule(name=NAMES, data=CONTENTS)
    def plant_file(self, name: str, data: bytes) -> None:
        self._clear(name)
        (self.out / name).write_bytes(data)
        self.model[name] = ("file", data)

    @precondition(lambda self: len(self.model) < 4)
    @rule(name=NAMES)
    def plant_directory(self, name: str) -> None:
        self._clear(name)
        (self.out / name).mkdir()
        self.model[name] = ("dir", None)

    def _clear(self, name: str) -> None:
        path = self.out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.is_symlink() or path.exists():
            path.unlink()
        self.model.pop(name, None)
        self.written.discard(name)

    @invariant()
    def the_folder_holds_what_was_written_and_planted(self) -> None:
        assert sorted(entry.name for entry in self.out.iterdir()) == sorted(self.model)
        for name, (kind, value) in self.model.items():
            path = self.out / name
            info = path.lstat()
            if kind == "file":
                assert stat.S_ISREG(info.st_mode), name
                assert path.read_bytes() == value, name
                if name in self.written:
                    assert stat.S_IMODE(info.st_mode) == 0o640, name
            elif kind == "link":
                assert stat.S_ISLNK(info.st_mode), name
                assert os.readlink(path) == value, name
            else:
                assert stat.S_ISDIR(info.st_mode), name

    @invariant()
    def nothing_outside_is_written(self) -> None:
        assert self.outside.read_bytes() == _PRECIOUS


_SETTINGS = settings(
    max_examples=80,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class UnnamedWrites(DirectoryWrites):
    unnamed = True


class TemporaryWrites(DirectoryWrites):
    unnamed = False


@pytest.mark.skipif(
    sys.platform != "linux" or not hasattr(os, "O_TMPFILE"), reason="O_TMPFILE is Linux's"
)
@pytest.mark.scenario(49)
def test_unnamed_writes_keep_the_location_whole() -> None:
    UnnamedWrites.TestCase.settings = _SETTINGS
    UnnamedWrites.TestCase().runTest()


@pytest.mark.scenario(49)
def test_temporary_writes_keep_the_location_whole() -> None:
    TemporaryWrites.TestCase.settings = _SETTINGS
    TemporaryWrites.TestCase().runTest()
