"""megatron_memorizing/owned.py: the one place that removes folders, and only marked ones."""

import os
import shutil
from pathlib import Path

import pytest

from megatron_memorizing import owned
from megatron_memorizing.owned import PARTIAL, NotOursError, delete, discard, make_marked_dir, remove_marked


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def filled(path: Path) -> Path:
    (path / "sub" / "deeper").mkdir(parents=True)
    (path / "sub" / "deeper" / "weights.bin").write_bytes(b"\0" * 64)
    (path / "notes.txt").write_text("mine")
    return path


def test_a_folder_without_the_marker_is_refused_and_left_as_it_was(tmp_path):
    users = filled(tmp_path / "users")
    before = tree(tmp_path)
    for call in (lambda: remove_marked(users), lambda: remove_marked(users, missing_ok=True),
                 lambda: remove_marked(users, keep_folder=True), lambda: remove_marked(users, "export.json")):
        with pytest.raises(NotOursError, match=f"{users} has no .*: it is not this project's to remove"):
            call()
    assert discard(users) is False
    (users / PARTIAL).touch()  # marked as something else's kind does not count either
    with pytest.raises(NotOursError, match="has no export.json"):
        remove_marked(users, "export.json")
    (users / PARTIAL).unlink()
    assert tree(tmp_path) == before and (users / "notes.txt").read_text() == "mine"


def test_a_marked_folder_is_removed_with_everything_in_it(tmp_path):
    ours = filled(make_marked_dir(tmp_path / "ours"))
    (ours / "link").symlink_to(tmp_path / "elsewhere")  # a link is removed, never followed
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("kept")
    remove_marked(ours)
    assert not ours.exists() and (tmp_path / "elsewhere" / "keep.txt").read_text() == "kept"
    remove_marked(ours, missing_ok=True)  # already gone: nothing to do
    with pytest.raises(NotOursError):
        remove_marked(ours)

    export = filled(tmp_path / "export")
    (export / "export.json").write_text("{}")
    remove_marked(export, "export.json")  # a marker of its own kind
    assert not export.exists()


def test_keep_folder_empties_a_marked_folder_and_keeps_it(tmp_path):
    out = filled(tmp_path / "out")
    owned.mark(out)
    remove_marked(out, keep_folder=True)
    assert out.is_dir() and list(out.iterdir()) == []


def test_a_link_to_a_marked_folder_is_not_removed(tmp_path):
    target = filled(make_marked_dir(tmp_path / "target"))
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(NotOursError, match="is a link to"):
        remove_marked(tmp_path / "link")
    assert (target / "notes.txt").read_text() == "mine" and (target / PARTIAL).is_file()


def test_a_removal_cut_short_leaves_the_folder_marked(tmp_path, monkeypatch):
    ours = filled(make_marked_dir(tmp_path / "ours"))
    removed = []
    real_unlink = Path.unlink

    def unlink(self, *args, **kwargs):
        if self.name == "notes.txt":
            raise PermissionError(13, "Permission denied", str(self))
        removed.append(self.name)
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(PermissionError):
        remove_marked(ours)
    assert PARTIAL not in removed and (ours / PARTIAL).is_file() and (ours / "notes.txt").is_file()
    assert discard(ours) is False and (ours / PARTIAL).is_file()  # the clean-up after a failure never raises

    monkeypatch.setattr(Path, "unlink", real_unlink)
    remove_marked(ours)  # a later removal finishes the job, the marker last
    assert not ours.exists()


def test_the_marker_goes_after_everything_else(tmp_path, monkeypatch):
    ours = filled(make_marked_dir(tmp_path / "ours"))
    order = []
    real_unlink, real_rmtree = Path.unlink, shutil.rmtree
    monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: (order.append(self.name), real_unlink(self, *a, **k)))
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: (order.append(Path(path).name), real_rmtree(path)))
    remove_marked(ours)
    assert sorted(order[:-1]) == ["notes.txt", "sub"] and order[-1] == PARTIAL


def test_delete_renames_first_and_removes(tmp_path, monkeypatch):
    ckpt = filled(tmp_path / "iter_0000001")
    seen = []
    real_remove = owned.remove_marked
    monkeypatch.setattr(owned, "remove_marked", lambda path, *a, **k: (seen.append(tree(tmp_path)),
                                                                         real_remove(path, *a, **k)))
    delete(ckpt)
    assert not ckpt.exists() and tree(tmp_path) == []
    assert "iter_0000001.deleted.tmp/" + PARTIAL in seen[0] and not any(p.startswith("iter_0000001/") for p in seen[0])


def test_make_marked_dir_never_takes_an_existing_folder(tmp_path):
    (tmp_path / "there").mkdir()
    with pytest.raises(FileExistsError):
        make_marked_dir(tmp_path / "there")
    assert not (tmp_path / "there" / PARTIAL).exists()
    assert os.listdir(make_marked_dir(tmp_path / "a" / "b")) == [PARTIAL]
