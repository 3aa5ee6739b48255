"""Atomic writes: files and folders follow the user's umask, and temporaries of a killed writer are cleaned."""

import os

import pytest

from loopfit import LoopfitError
from loopfit.io import atomic_dir, atomic_file, folder_lock


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_written_files_and_folders_follow_the_umask(tmp_path, umask_027):
    with atomic_file(tmp_path / "a.txt", "w") as f:
        f.write("x")
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "b.txt").write_text("y")
        os.chmod(tmp / "b.txt", 0o600)  # as safetensors creates its files
    assert (tmp_path / "folder/b.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o750


def test_a_killed_writers_temporaries_are_removed_by_the_next_write(tmp_path):
    pid = 2**22 + 1  # above Linux's largest pid: no process has it
    (tmp_path / f".out.tmp-{pid}-x1y2").mkdir()
    (tmp_path / f".out.json.tmp-{pid}-k3").write_text("half")
    (tmp_path / f".out.tmp-{os.getppid()}-live").mkdir()  # a live writer's temporary stays
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("z")
    with atomic_file(tmp_path / "out.json", "w") as f:
        f.write("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", "out.json", f".out.tmp-{os.getppid()}-live"])


def test_folder_lock_refuses_a_second_holder_and_a_refused_start_leaves_nothing(tmp_path):
    with folder_lock(tmp_path / "run", "train.out_dir"):
        held = rf"train.out_dir .*run is in use by a running loopfit \(pid {os.getpid()}\)"
        with pytest.raises(LoopfitError, match=held):
            with folder_lock(tmp_path / "run", "train.out_dir"):
                pass
    assert not (tmp_path / "run").exists()  # created for the lock alone: removed with it
