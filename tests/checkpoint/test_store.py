"""The checkpoint folder rules: commit order, completeness, skipping damaged folders, pruning (no processes)."""

from __future__ import annotations

import os

import pytest

from mtp_megatron.checkpoint import store


def _fake_save(root, step: int, commit: bool = True, files=(("__0_0.distcp", 100), ("common.pt", 10))) -> str:
    """A folder shaped like a finished save of ``step`` (with our manifest), committed or left as ``.tmp``."""
    final = os.path.join(root, store.step_dir_name(step))
    tmp = store.temporary_path(final)
    os.makedirs(tmp)
    for name, size in files:
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(b"x" * size)
    store.write_manifest(tmp, step, {"layout": {"tp": 1, "pp": 1, "dp": 1}})
    if commit:
        store.commit(tmp, final)
    return final


def test_commit_renames_then_points_latest(tmp_path):
    root = str(tmp_path)
    first = _fake_save(root, 2)
    assert open(os.path.join(root, store.LATEST)).read().strip() == "iter_0000002"
    second = _fake_save(root, 4)
    assert open(os.path.join(root, store.LATEST)).read().strip() == "iter_0000004"
    assert not os.path.exists(store.temporary_path(second))
    assert store.read_manifest(first)["files"] == {"__0_0.distcp": 100, "common.pt": 10}
    assert store.newest_complete(root) == second


def test_unfinished_save_is_never_picked(tmp_path):
    root = str(tmp_path)
    done = _fake_save(root, 2)
    _fake_save(root, 4, commit=False)  # killed before the rename
    assert store.newest_complete(root) == done
    assert store.stale_temporaries(root) == [os.path.join(root, "iter_0000004.tmp")]
    assert open(os.path.join(root, store.LATEST)).read().strip() == "iter_0000002"


@pytest.mark.parametrize("damage", ["delete_shard", "truncate_shard", "delete_manifest"])
def test_damaged_checkpoint_is_skipped_with_the_file_named(tmp_path, damage):
    root = str(tmp_path)
    good = _fake_save(root, 2)
    bad = _fake_save(root, 4)
    shard = os.path.join(bad, "__0_0.distcp")
    if damage == "delete_shard":
        os.remove(shard)
    elif damage == "truncate_shard":
        with open(shard, "wb") as f:
            f.write(b"x" * 7)
    else:
        os.remove(os.path.join(bad, store.MANIFEST))
    with pytest.warns(UserWarning, match="skipping checkpoint .*iter_0000004"):
        assert store.newest_complete(root) == good
    with pytest.raises(store.CheckpointError) as error:
        store.verify(bad)
    named = store.MANIFEST if damage == "delete_manifest" else "__0_0.distcp"
    assert named in str(error.value) and "Fix:" in str(error.value)


def test_prune_keeps_the_newest_complete(tmp_path):
    root = str(tmp_path)
    folders = [_fake_save(root, step) for step in (2, 4, 6, 8)]
    assert store.prune(root, None) == []
    assert store.prune(root, 2) == folders[:2]
    assert [os.path.basename(f) for f in store.committed(root)] == ["iter_0000006", "iter_0000008"]


def test_step_names():
    assert store.step_of("/a/b/iter_0001234") == 1234
    assert store.step_of("/a/b/iter_0001234.tmp") is None
    assert store.step_of("latest") is None
