"""The checkpoint folder rules: commit order, completeness, skipping damaged folders, pruning (no processes)."""

from __future__ import annotations

import os
import time

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
    assert store.read_manifest(first)["files"] == {"__0_0.distcp": {"bytes": 100}, "common.pt": {"bytes": 10}}
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


def _fake_save_with_checksums(root, step: int) -> str:
    final = os.path.join(root, store.step_dir_name(step))
    tmp = store.temporary_path(final)
    os.makedirs(tmp)
    for name, content in (("__0_0.distcp", b"a" * 64), ("common.pt", b"b" * 8)):
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(content)
    checksums = {name: store.file_crc32(os.path.join(tmp, name)) for name in store.list_files(tmp)}
    store.write_manifest(tmp, step, {}, checksums)
    store.commit(tmp, final)
    return final


def test_a_file_corrupted_in_place_fails_its_checksum_by_name(tmp_path):
    folder = _fake_save_with_checksums(str(tmp_path), 2)
    assert store.problems(folder, checksums=True) == []
    shard = os.path.join(folder, "__0_0.distcp")
    with open(shard, "r+b") as f:  # same size, other bytes
        f.seek(10)
        f.write(b"Z")
    assert store.problems(folder) == []  # sizes alone cannot see it
    assert store.problems(folder, checksums=True) == [f"{shard} does not match its checksum (corrupted in place)"]
    # Each rank checks its share: the shares cover every file once.
    names = store.manifest_names(folder)
    assert sorted(n for r in range(3) for n in store.share(names, r, 3)) == names


def test_latest_decides_where_a_restart_continues(tmp_path):
    root = str(tmp_path)
    folders = [_fake_save(root, step) for step in (2, 4, 6)]
    assert store.resume_line(root) == (folders[::-1], [])
    # latest edited by hand to an older checkpoint: a rollback, and the later ones are the abandoned line.
    time.sleep(0.01)
    store.write_latest(root, "iter_0000004")
    assert store.resume_line(root) == ([folders[1], folders[0]], [folders[2]])
    moved = store.roll_back(root, folders[1], [folders[2]])
    assert [os.path.basename(p) for p in store.committed(root)] == ["iter_0000002", "iter_0000004"]
    assert os.path.isdir(moved[0]) and store.problems(moved[0]) == []  # kept, complete, out of the way
    assert store.rollback_done(root, folders[1])["set_aside"] == moved
    assert store.rollback_done(root, folders[0]) is None


def test_a_commit_that_died_before_updating_latest_is_still_the_newest(tmp_path):
    root = str(tmp_path)
    _fake_save(root, 2)
    newer = _fake_save(root, 4, commit=False)
    time.sleep(0.01)
    os.rename(store.temporary_path(newer), newer)  # renamed, and killed before writing latest
    assert store.read_latest(root) == os.path.join(root, "iter_0000002")
    assert store.resume_line(root)[0][0] == newer and store.resume_line(root)[1] == []


def test_saving_a_step_again_sets_the_old_folder_aside(tmp_path):
    root = str(tmp_path)
    first = _fake_save(root, 2)
    with open(os.path.join(first, "marker"), "w") as f:
        f.write("old line")
    _fake_save(root, 2)
    kept = [os.path.join(p, n) for p, _, names in os.walk(os.path.join(root, store.SET_ASIDE)) for n in names]
    assert any(path.endswith("iter_0000002/marker") for path in kept)


def test_a_resave_cut_short_between_its_renames_is_committed_at_the_next_start(tmp_path):
    """Re-saving step 2: the old iter_2 was set aside, then the process died before iter_2.tmp (complete, with
    its manifest) got its name. The next start commits it (it is the newest state, and ``latest`` names it)
    instead of deleting it, and the old folder stays in set_aside/."""
    from mtp_megatron.checkpoint.resume_plan import start_plan
    from mtp_megatron.config.schema import CheckpointConfig

    root = str(tmp_path)
    _fake_save(root, 1)
    old = _fake_save(root, 2)
    new = _fake_save(root, 2, commit=False, files=(("__0_0.distcp", 123), ("common.pt", 10)))
    store.set_aside(root, [old])  # the first half of commit(), then the crash
    assert store.read_latest(root) == old and not os.path.exists(old)

    plan = start_plan(CheckpointConfig(), root)
    assert plan["candidates"][0] == new
    assert store.read_manifest(new)["files"]["__0_0.distcp"] == {"bytes": 123}
    assert not os.path.exists(store.temporary_path(new))
    assert any("committed it now" in note for note in plan["notes"])
    kept = [os.path.join(p, n) for p, _, names in os.walk(os.path.join(root, store.SET_ASIDE)) for n in names]
    assert any(path.endswith("iter_0000002/__0_0.distcp") for path in kept)


def test_a_save_without_its_manifest_is_still_dropped(tmp_path):
    """Only a save whose manifest was written (all ranks done) is committed at the next start."""
    from mtp_megatron.checkpoint.resume_plan import start_plan
    from mtp_megatron.config.schema import CheckpointConfig

    root = str(tmp_path)
    _fake_save(root, 1)
    partial = store.temporary_path(os.path.join(root, store.step_dir_name(2)))
    os.makedirs(partial)
    with open(os.path.join(partial, "__0_0.distcp"), "wb") as f:
        f.write(b"x")
    with pytest.warns(UserWarning, match="did not finish"):
        plan = start_plan(CheckpointConfig(), root)
    assert plan["candidates"] == [os.path.join(root, "iter_0000001")] and not os.path.exists(partial)
