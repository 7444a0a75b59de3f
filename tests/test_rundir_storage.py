"""The run directory on unkind storage: a rewrite of a checkpoint's step that fails part-way
keeps that step's checkpoint; a job whose lock another job took (a lapsed lease on NFS, a
removed lock file) writes nothing more there; temporaries a killed writer left go when the
directory is next locked; files and directories honour the umask; a failing run leaves no
lock file."""

import errno
import fcntl
import json
import os
import re

import mxnet as mx
import numpy as np
import pytest

from conftest import TINY, data_args
from dist_lm.cli import main
from dist_lm.data.cache import CorpusCache
from dist_lm.errors import RunDirBusy, RunDirLost, UsageError, exit_code_of
from dist_lm.training import observe
from dist_lm.training import rundir as R
from dist_lm.training.checkpoint import find_resume, list_checkpoints, verify
from dist_lm.training.rundir import RunDir


@pytest.fixture(autouse=True)
def no_retry_pauses(monkeypatch):
    """Transient storage errors are tried again at once here (rundir.retrying)."""
    monkeypatch.setattr(R, "RETRY_DELAYS_S", (0.0, 0.0, 0.0))


def tiny_model(value=0.0):
    """A block with save_parameters, as the run's model: Dense(2, in_units=3)."""
    block = mx.gluon.nn.Dense(2, in_units=3)
    block.initialize(mx.init.Constant(value))
    return block


def save(run_dir, step, keep=5, value=0.0):
    """A checkpoint of step through the run directory, as Checkpointer.save writes it."""
    hidden = [np.zeros((1, 2, 3), np.float32)]  # (L, G, H)
    run_dir.save_checkpoint(step, tiny_model(value), {}, hidden,
                            {"progress": {"step": step}, "value": value}, keep, None)


def steps(directory):
    return [verify(p).meta["step"] for p in list_checkpoints(directory)]


def tree(directory):
    """Every file under directory and its bytes: what a fenced-out job must not change
    (but for TensorBoard's event files: one per writing process, the old job's own)."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            if name.startswith("events.out.tfevents."):
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, directory)] = fh.read()
    return found


# --- 1. a rewrite of a step ----------------------------------------------------------

def failing_rename(monkeypatch, fails):
    """os.rename raising EIO for the renames fails(src, dst) picks."""
    real = os.rename

    def rename(src, dst):
        if fails(str(src), str(dst)):
            raise OSError(errno.EIO, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)


def test_a_rewrite_of_a_step_whose_rename_fails_keeps_that_steps_checkpoint(
        tmp_path, monkeypatch):
    run_dir = RunDir(str(tmp_path))
    ckpts = tmp_path / "checkpoints"
    save(run_dir, 3, keep=1)
    save(run_dir, 5, keep=1, value=1.0)  # the epoch end's checkpoint, taken at step 5
    assert steps(ckpts) == [5]
    before = verify(list_checkpoints(ckpts)[0]).meta["files"]
    # The resumed run saves step 5 again; the new one cannot be renamed into place.
    failing_rename(monkeypatch, lambda src, dst: ".tmp-step-" in src)
    with pytest.raises(UsageError) as err:
        save(run_dir, 5, keep=1, value=2.0)
    monkeypatch.undo()
    run_dir.release()
    assert sorted(os.listdir(ckpts)) == ["step-000000005"]
    found = find_resume("auto", str(ckpts), strict=True)
    assert found.meta["step"] == 5 and found.meta["files"] == before
    assert str(err.value) == (f"cannot write the checkpoint of step 5 in {ckpts}: "
                              f"Input/output error; the previous checkpoint is intact "
                              f"(step-000000005)")


def test_a_rewrite_killed_between_its_renames_is_put_back_when_next_locked(
        tmp_path, monkeypatch, capsys):
    run_dir = RunDir(str(tmp_path))
    ckpts = tmp_path / "checkpoints"
    save(run_dir, 3, keep=1)
    save(run_dir, 5, keep=1, value=1.0)
    before = verify(list_checkpoints(ckpts)[0]).meta["files"]
    # As a kill (or a second signal) would: once the old checkpoint is renamed aside,
    # no other rename happens.
    failing_rename(monkeypatch, lambda src, dst: os.path.basename(src) != "step-000000005")
    with pytest.raises(UsageError) as err:
        save(run_dir, 5, keep=1, value=2.0)
    aside = ckpts / ".replaced-step-000000005"
    assert str(err.value).endswith(
        f"; the earlier checkpoint of step 5 is whole under {aside}, and is put back when "
        f"the run directory is next locked (--resume auto)"), err.value
    monkeypatch.undo()
    run_dir.release()
    assert sorted(os.listdir(ckpts)) == [".replaced-step-000000005"]
    capsys.readouterr()

    again = RunDir(str(tmp_path))  # the restart, --resume auto
    try:
        assert "put back the checkpoint of step 5" in capsys.readouterr().err
        found = again.find_resume("auto", strict=True)
        assert found.meta["step"] == 5 and found.meta["files"] == before
        assert sorted(os.listdir(ckpts)) == ["step-000000005"]
    finally:
        again.release()


def test_a_finished_rewrite_replaces_the_step_and_leaves_nothing_aside(tmp_path):
    run_dir = RunDir(str(tmp_path))
    save(run_dir, 5, value=1.0)
    save(run_dir, 5, value=2.0)
    run_dir.release()
    ckpts = tmp_path / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["step-000000005"]
    assert verify(ckpts / "step-000000005").meta["value"] == 2.0


# --- 2. fencing: a holder whose lock was taken over --------------------------------------

def take_over(path):
    """Another job takes the run directory: its lock broken (the file removed, as a lapsed
    NFS lease or a local_lock mount lets another node do), then locked anew."""
    os.unlink(os.path.join(path, ".lock"))
    return RunDir(path)


@pytest.mark.parametrize("when", ["before the write", "during the write",
                                  "after the rename, before the prune"])
def test_a_holder_whose_lock_was_taken_over_renames_prunes_and_appends_nothing(
        tmp_path, monkeypatch, when):
    path = str(tmp_path)
    old = RunDir(path)
    save(old, 1, keep=1)
    reporter = observe.Reporter(path, fence=old.fence)
    reporter.record("train", 1, 10, {"train/loss": 5.0})
    holder = {}

    def new_job():
        holder["new"] = new = take_over(path)
        save(new, 2, keep=5)  # the new job's checkpoint and metrics
        with open(os.path.join(path, "metrics.jsonl"), "a") as fh:
            fh.write(json.dumps({"kind": "train", "step": 2}) + "\n")
        holder["tree"] = tree(path)

    if when == "before the write":
        new_job()
    elif when == "during the write":
        model = tiny_model()
        real_save = model.save_parameters
        model.save_parameters = lambda f: (real_save(f), new_job())
    else:
        real = os.rename

        def rename(src, dst):
            real(src, dst)
            if str(dst).endswith("step-000000003"):
                new_job()

        monkeypatch.setattr(os, "rename", rename)

    hidden = [np.zeros((1, 2, 3), np.float32)]
    with pytest.raises(RunDirLost, match=re.escape(
            f"run directory {path} is no longer locked by this job (another job holds it "
            f"now: host ") + r".*\); this job stopped without writing there again$"):
        old.save_checkpoint(3, model if when == "during the write" else tiny_model(), {},
                            hidden, {"progress": {"step": 3}}, 1, None)
    monkeypatch.undo()
    snapshot = tree(path)
    assert snapshot == holder["tree"]
    assert steps(tmp_path / "checkpoints") == \
        ([1, 2, 3] if when.startswith("after") else [1, 2])  # nothing pruned
    with pytest.raises(RunDirLost):
        reporter.record("train", 3, 30, {"train/loss": 4.0})
    with pytest.raises(RunDirLost):
        old.write_json("config.json", {"old": True})
    with pytest.raises(RunDirLost):
        old.save_params("final.params", tiny_model())
    with pytest.raises(RunDirLost):
        save(old, 4, keep=1)
    reporter.close()
    old.release()  # must not remove the new holder's lock file
    assert tree(path) == snapshot
    token = json.loads((tmp_path / ".lock").read_text())["token"]
    assert token == holder["new"].lock.token
    with pytest.raises(RunDirBusy):
        RunDir(path)
    holder["new"].release()


def test_a_removed_lock_file_stops_its_holder_before_any_write(tmp_path):
    run_dir = RunDir(str(tmp_path))
    os.unlink(tmp_path / ".lock")
    with pytest.raises(RunDirLost, match=r"\(its lock file was removed\); this job stopped"):
        run_dir.write_text("vocab.json", "{}")
    assert not (tmp_path / "vocab.json").exists()
    run_dir.release()


@pytest.mark.medium
def test_a_training_job_whose_run_directory_is_taken_over_stops_with_exit_6(
        heldout, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    real = observe.Reporter.record
    taken = {}

    def record(self, kind, step, tokens, values):
        if kind == "checkpoint" and not taken:  # right after the first checkpoint
            taken["job"] = take_over(str(run_dir))
            taken["before"] = tree(run_dir)
        return real(self, kind, step, tokens, values)

    monkeypatch.setattr(observe.Reporter, "record", record)
    code = main(["train", *data_args(heldout, heldout, heldout), *TINY, "--log-interval", "5",
                 "--checkpoint-steps", "5", "--max-steps", "20", "--run-dir", str(run_dir)])
    out, err = capsys.readouterr()
    assert code == 6, err
    assert re.fullmatch(rf"dist-lm: error: run directory {re.escape(str(run_dir))} is no "
                        rf"longer locked by this job \(another job holds it now: host .*, "
                        rf"pid {os.getpid()}, since .*\); this job stopped without writing "
                        rf"there again\n", err), err
    assert tree(run_dir) == taken["before"]
    assert steps(run_dir / "checkpoints") == [5]
    taken["job"].release()
    assert not (run_dir / ".lock").exists()


# --- 3. temporaries a killed writer left -------------------------------------------------

def test_the_temporaries_a_killed_writer_left_go_when_the_directory_is_locked(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / ".tmp-step-000000007").mkdir(parents=True)
    (ckpts / ".tmp-step-000000007" / "model.params").write_bytes(b"half")
    stale = [".config.json.k2_x9ab0.tmp", ".metrics.jsonl.abcdefgh.tmp",
             ".best.params.0123456_.tmp"]
    kept = ["notes.tmp", ".config.json.tmp", ".x.toolong123.tmp", "config.json",
            ".metrics.jsonl.ABCDEFGH.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_text("x")
    (tmp_path / ".dir.abcdefgh.tmp").mkdir()  # not a file of atomic_write's
    (ckpts / "step-000000005").mkdir()

    holder = RunDir(str(tmp_path))
    left = sorted(os.listdir(tmp_path))
    assert left == sorted(kept + [".dir.abcdefgh.tmp", ".lock", "checkpoints"]), left
    assert sorted(os.listdir(ckpts)) == ["step-000000005"]

    # A job refused by the holder removes nothing: those are the holder's writes.
    (tmp_path / ".vocab.json.abcdefgh.tmp").write_text("in progress")
    (ckpts / ".tmp-step-000000009").mkdir()
    with pytest.raises(RunDirBusy):
        RunDir(str(tmp_path))
    assert (tmp_path / ".vocab.json.abcdefgh.tmp").exists()
    assert (ckpts / ".tmp-step-000000009").exists()
    holder.release()


def test_atomic_write_names_its_temporaries_as_the_clean_up_expects(tmp_path, monkeypatch):
    seen = []
    R.write_text(str(tmp_path / "config.json"), "{}",
                 fence=lambda: seen.extend(os.listdir(tmp_path)))
    assert len(seen) == 1 and R.TMP_NAME.match(seen[0]) and \
        seen[0].startswith(".config.json."), seen


# --- 4. the umask ------------------------------------------------------------------------

@pytest.fixture
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.mark.parametrize("umask", [0o022, 0o027], indirect=True)
def test_files_and_directories_of_a_run_and_the_cache_honour_the_umask(
        umask, tmp_path, heldout):
    run_path = tmp_path / "run"
    run_dir = RunDir(str(run_path))
    try:
        run_dir.write_json("config.json", {"a": 1})
        run_dir.write_text("vocab.json", "{}")
        run_dir.save_params("best.params", tiny_model())
        save(run_dir, 5)
        reporter = observe.Reporter(str(run_path))
        reporter.record("train", 5, 50, {"train/loss": 5.0})
        reporter.close()
        modes = {}
        for root, dirs, files in os.walk(run_path):
            for name in dirs + files:
                path = os.path.join(root, name)
                modes[os.path.relpath(path, run_path)] = os.stat(path).st_mode & 0o777
    finally:
        run_dir.release()
    cache_root = tmp_path / "cache"
    cache = CorpusCache(str(cache_root), parts=1)
    vocab = cache.vocab(str(heldout), 1, None)
    cache.ids(str(heldout), vocab)
    for name in os.listdir(cache_root):
        modes[f"cache/{name}"] = os.stat(cache_root / name).st_mode & 0o777

    expected = {name: (0o777 if os.path.isdir(os.path.join(run_path, name)) or
                       os.path.isdir(tmp_path / name) else 0o666) & ~umask
                for name in modes}
    for name in ("config.json", "vocab.json", "best.params", "metrics.jsonl",
                 "checkpoints", "checkpoints/step-000000005/model.params"):
        assert name in modes
    assert [n for n in modes if n.startswith("cache/ids-")] and \
        [n for n in modes if n.startswith("cache/vocab-")]
    assert modes == expected, {n: oct(m) for n, m in modes.items() if m != expected[n]}


# --- 5. the lock file of a run that failed -----------------------------------------------

def test_a_job_opening_the_lock_file_as_its_holder_releases_it_locks_the_new_one(
        tmp_path, monkeypatch):
    """The holder removes .lock as it releases; a job that opened the file just before
    must not hold a lock on the removed file while a third locks the new one."""
    first = RunDir(str(tmp_path))
    real = fcntl.flock
    calls = []

    def flock(fd, op):
        if not calls:
            first.release()  # between the second job's open and its flock
        calls.append(fd)
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    second = RunDir(str(tmp_path))
    monkeypatch.undo()
    assert len(calls) == 2  # locked the removed file, saw it, locked the new one
    held, named = os.fstat(second.lock.fd), os.stat(tmp_path / ".lock")
    assert (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
    with pytest.raises(RunDirBusy):
        RunDir(str(tmp_path))
    second.release()


def bad_checkpoint(tmp_path):
    path = tmp_path / "bad-checkpoint"
    path.mkdir()
    (path / "meta.json").write_text("{not json")
    return path


@pytest.mark.parametrize("bad", ["data", "checkpoint"])
def test_a_run_that_fails_on_bad_input_leaves_no_lock_and_a_second_run_starts(
        bad, heldout, tmp_path, capsys):
    run_dir = tmp_path / "run"
    if bad == "data":
        data = tmp_path / "bad.tokens"
        data.write_bytes(b"\xff\xfe not utf-8\n")
        args = data_args(data, data, data)
    else:
        args = [*data_args(heldout, heldout, heldout), "--resume", str(bad_checkpoint(tmp_path))]
    code = main(["train", *args, *TINY, "--max-steps", "2", "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert os.listdir(run_dir) == []  # no .lock left behind
    RunDir(str(run_dir)).release()


# --- transient storage errors ---------------------------------------------------------------

@pytest.mark.parametrize("code,fails,tries,written", [
    (errno.EIO, 2, 3, True),       # passes on the third try
    (errno.ESTALE, 9, 4, False),   # never passes: 1 + 3 tries, then exit 7
    (errno.ENOSPC, 2, 3, True),    # a full disk freed within the tries
    (errno.EACCES, 9, 1, False)])  # not transient: no second try, exit 2
def test_a_checkpoint_write_is_tried_again_while_storage_fails_transiently(
        tmp_path, monkeypatch, capsys, code, fails, tries, written):
    from dist_lm.training import checkpoint

    run_dir = RunDir(str(tmp_path))
    real, calls = checkpoint.write_checkpoint, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) <= fails:
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "write_checkpoint", flaky)
    if written:
        save(run_dir, 4)
        assert steps(tmp_path / "checkpoints") == [4]
    else:
        with pytest.raises(UsageError) as err:
            save(run_dir, 4)
        assert exit_code_of(err.value) == (7 if code != errno.EACCES else 2)
        assert os.strerror(code) in str(err.value)
    assert len(calls) == tries
    notes = [x for x in capsys.readouterr().err.splitlines() if "trying again" in x]
    assert len(notes) == tries - 1
    assert all(x.startswith("dist-lm: note: the checkpoint write of step 4 failed (")
               for x in notes)
    run_dir.release()


@pytest.mark.parametrize("free,code", [(0, 7), (10 ** 12, 2)])
def test_a_short_write_on_a_full_disk_is_storage_that_may_pass(tmp_path, monkeypatch, free,
                                                               code):
    """MXNet reports a full disk as a short write that names no cause: with less room
    left than the parameters take it is ENOSPC (tried again, then exit 7), else exit 2
    as before (a file-size limit)."""
    from dist_lm.training import checkpoint

    run_dir = RunDir(str(tmp_path))

    def short(*args, **kwargs):
        raise mx.base.MXNetError("FileStream.Write incomplete")

    class Stat:
        f_bavail, f_frsize = free, 1

    monkeypatch.setattr(checkpoint, "write_checkpoint", short)
    monkeypatch.setattr(os, "statvfs", lambda path: Stat())
    with pytest.raises(UsageError) as err:
        save(run_dir, 4)
    assert exit_code_of(err.value) == code
    assert ("No space left on device" in str(err.value)) == (code == 7)
    run_dir.release()
