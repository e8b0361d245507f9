"""lowbit.files.atomic_directory: all or nothing, and no writing over directories lowbit did not write."""

import stat

import pytest

from lowbit.files import MARKER, atomic_directory, atomic_file


def test_success_replaces_the_target_whole(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target, "test") as staging:
        (staging / "a.txt").write_text("first")
    with atomic_directory(target, "test") as staging:  # lowbit wrote it: replacing needs no overwrite
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == sorted([MARKER, "b.txt"])
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or retired directory left


def test_failure_halfway_leaves_nothing_and_keeps_the_old_target(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    with atomic_directory(old, "test") as staging:
        (staging / "kept.txt").write_text("kept")
    for target in (new, old):
        with pytest.raises(RuntimeError, match="disk full"):
            with atomic_directory(target, "test") as staging:
                (staging / "half.txt").write_text("half")
                raise RuntimeError("disk full")
    assert not new.exists()
    assert (old / "kept.txt").read_text() == "kept" and not (old / "half.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_refuses_a_foreign_non_empty_directory_unless_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with atomic_directory(tmp_path, "test"):
            pass
    assert (tmp_path / "notes.txt").read_text() == "mine"
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        with atomic_directory(target, "test", overwrite=True):
            pass
    with atomic_directory(tmp_path, "test", overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MARKER, "new.txt"])


def test_written_file_and_directory_get_the_modes_a_plain_open_and_mkdir_give(tmp_path):
    """mkstemp / mkdtemp stage with 0o600 / 0o700; a saved checkpoint must be readable like any other file."""
    plain_file, plain_dir = tmp_path / "plain.txt", tmp_path / "plain"
    plain_file.write_text("x")
    plain_dir.mkdir()
    with atomic_file(tmp_path / "state.json") as staging:
        staging.write_text("{}")
    with atomic_directory(tmp_path / "export", writer="test") as staging:
        (staging / "a.txt").write_text("a")
    assert stat.S_IMODE((tmp_path / "state.json").stat().st_mode) == stat.S_IMODE(plain_file.stat().st_mode)
    assert stat.S_IMODE((tmp_path / "export").stat().st_mode) == stat.S_IMODE(plain_dir.stat().st_mode)
