"""Checkpoints under the faults a real job meets, on CPU (subprocesses where a process has to die):

- kill -9 at random moments of runs that save every step (sync and async), and a crash before (or in the
  middle of) every file-system operation of the publication: `latest` always names a complete checkpoint,
  which loads, and the next run removes a dead writer's temporaries; the resumed losses are bit for bit
  those of an uninterrupted run;
- SIGTERM / SIGUSR1 / a first SIGINT: save, exit 75 with one line saying where; the resumed run continues
  at the saved step with the losses of an uninterrupted run; a second SIGINT exits at once (130), also
  while the checkpoint is being written;
- checkpoint.time_limit: stop with a checkpoint before the limit;
- no space left on device during a save (injected into DCP's writer and into the publication, and a real
  full tmpfs where mounting is allowed): reported, training goes on, a failure of the last save is one
  CheckpointError naming the file; `latest` stays the previous complete checkpoint, no temporary is left;
- corrupt or mismatched checkpoints: one CheckpointError line (exit 5) naming the path, before anything is
  changed; a checkpoint root holding other files is refused (exit 6); retention keeps what it promises.

The kill trials draw their delays from a seeded generator (TESSERA_KILL_SEED overrides the seed), print
them, and name them in every assertion message. The longer kill trials are marked slow and run only when
selected (`pytest -m slow`, or TESSERA_SLOW=1).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch.distributed.checkpoint.filesystem as dcp_fs

from engine.checkpoint import files, manager
from engine.checkpoint.files import MARKER, META, complete_steps, latest_step, resolve_checkpoint
from engine.cli import main as cli_main
from engine.config import load_config
from engine.errors import EXIT_INTERRUPTED, EXIT_STOPPED, CheckpointError, RunDirError, RunStopped
from engine.train.loop import train

REPO = Path(__file__).resolve().parents[1]
YAML = REPO / "examples" / "tiny.yaml"
# ~107k parameters, 64-token samples, 8 per step: ~25 ms a step and ~50 ms a (1.4 MB) save on 2 idle cores.
# The LR is constant after a warmup longer than the runs here, so a run's steps do not depend on
# train.iters; nor does the data order while a run stays within one epoch (7,196 samples: 899 steps). Dropout
# makes the losses depend on the restored RNG streams.
SMALL = ["model.n_layers=2", "model.d_model=64", "model.ffn_hidden=128", "model.max_seq_len=64",
         "train.micro_batch_size=4", "train.global_batch_size=8", "train.eval_interval=0", "train.log_interval=1",
         "train.tensorboard=false", "train.progress=false", "train.sample_prompt=null", "optim.decay=constant",
         "model.dropout=0.1"]
LONG = 800  # train.iters of a run that is stopped or killed long before its end (one epoch)
TMP_GLOB = ".step-*.tmp-*"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One data cache for every run of this module (the builtin corpus is preprocessed once)."""
    return tmp_path_factory.mktemp("data_cache")


def _overrides(tmp: Path, cache: Path, *extra: str, ck: Optional[Path] = None, run: Optional[Path] = None) -> list[str]:
    return [*SMALL, f"data.cache_dir={cache}", f"train.out_dir={run or tmp / 'run'}",
            f"checkpoint.dir={ck or tmp / 'ck'}", *extra]


def _cfg(tmp: Path, cache: Path, *extra: str, ck: Optional[Path] = None, run: Optional[Path] = None):
    return load_config(str(YAML), _overrides(tmp, cache, *extra, ck=ck, run=run))


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    env.pop("TESSERA_DEBUG", None)
    return env


class Proc:
    """`python -m engine train` (or another command line) in the background, its output in files."""

    def __init__(self, tmp: Path, args: list[str], name: str = "proc", argv: Optional[list[str]] = None) -> None:
        self.out_path, self.err_path = tmp / f"{name}.stdout", tmp / f"{name}.stderr"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.p = subprocess.Popen((argv or [sys.executable, "-m", "engine"]) + ["train", str(YAML), *args],
                                      cwd=REPO, env=_env(), stdout=out, stderr=err, text=True)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait_for(self, cond: Callable[[], object], what: str, timeout: float = 180.0, poll: float = 0.01) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.p.poll() is not None:
                raise AssertionError(f"the run exited ({self.p.returncode}) before {what}:\n{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no {what} after {timeout:.0f} s:\n{self.stderr[-3000:]}")
            time.sleep(poll)

    def wait(self, timeout: float = 180.0) -> int:
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the run did not exit within {timeout:.0f} s:\n{self.stderr[-3000:]}") from None

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def _logged(run: Path) -> list[dict]:
    """metrics.jsonl's step records, in file order (the last line of a killed run may be torn: skipped)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec and "step" in rec:
            out.append(rec)
    return out


def _temporaries(root: Path) -> list[str]:
    return sorted(p.name for p in Path(root).glob(TMP_GLOB))


def _step_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in Path(root).glob("step-*"))


def _snapshot(root: Path, skip: tuple[str, ...] = (".tessera.lock",)) -> dict[str, str]:
    """Every entry under `root` -> a digest of its bytes ("dir" for a directory)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.name in skip:
            continue
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _dead_pid() -> int:
    """The pid of a process that has exited (a writer that died)."""
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


class Reference:
    """The losses of uninterrupted runs of SMALL, step -> loss (one run, extended when a longer one is asked)."""

    def __init__(self, tmp: Path, cache: Path) -> None:
        self.tmp, self.cache, self.losses = tmp, cache, []

    def __call__(self, step: int) -> float:
        if step > len(self.losses):
            iters = max(step, 2 * len(self.losses), 40)
            assert iters < 899, "a reference run must stay within one epoch"
            cfg = load_config(str(YAML), [*SMALL, f"data.cache_dir={self.cache}", f"train.iters={iters}",
                                          f"train.out_dir={self.tmp / f'ref{iters}'}"])
            self.losses = train(cfg).losses
        return self.losses[step - 1]

    def check(self, records: list[dict], why: str = "") -> None:
        """Every logged loss equals the uninterrupted run's at its step, bit for bit."""
        wrong = [(r["step"], r["loss"], self(r["step"])) for r in records if r["loss"] != self(r["step"])]
        assert not wrong, f"{why}\n(step, loss, uninterrupted run's loss): {wrong[:5]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Reference:
    return Reference(tmp_path_factory.mktemp("reference"), cache)


@pytest.fixture(scope="module")
def good(tmp_path_factory, cache) -> tuple[Path, Path]:
    """(checkpoint root with complete step-0000001 and step-0000002, its run directory)."""
    tmp = tmp_path_factory.mktemp("good")
    train(_cfg(tmp, cache, "train.iters=2", "checkpoint.interval=1"))
    assert _step_dirs(tmp / "ck") == ["step-0000001", "step-0000002"]
    return tmp / "ck", tmp / "run"


@pytest.fixture
def load_into_trainer(cache, tmp_path):
    """load(path) -> tessera.json: engine.train.checkpointing.load_checkpoint into a fresh SMALL Trainer."""
    from engine.parallel.state import ParallelState
    from engine.train.checkpointing import load_checkpoint
    from engine.train.trainer import Trainer

    pstate = ParallelState.initialize(device="cpu")
    cfg = load_config(str(YAML), [*SMALL, f"data.cache_dir={cache}", "train.iters=4",
                                  f"train.out_dir={tmp_path / 'loader'}"])
    trainers = []

    def load(path) -> dict:
        trainers.append(Trainer(cfg, pstate))
        meta = load_checkpoint(trainers[-1], path)
        assert trainers[-1].iteration == meta["iteration"]
        return meta

    yield load
    for t in trainers:
        t.close()
    pstate.destroy()


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    """`tessera train examples/tiny.yaml ARGS` in this process: (exit code, stdout, stderr)."""
    rc = cli_main(["train", str(YAML), *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_error_line(rc: int, err: str, code: int, *needles: str) -> str:
    assert rc == code, (rc, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("tessera: error")]
    assert len(lines) == 1, err[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- 1. kill -9 while saving every step


def _kill_chain(tmp: Path, cache: Path, reference: Reference, n: int, async_save: bool, rng: random.Random,
                max_delay: float, log: list[str]) -> None:
    """`n` runs on one checkpoint root, each resuming (checkpoint.load=auto) from where the previous one was
    killed; even trials are killed at a random moment after their first checkpoint, odd ones while a save is
    in progress (a temporary directory was seen). Then an in-process run resumes and finishes."""
    mode = "async" if async_save else "sync"
    ck, run = tmp / "ck", tmp / "run"
    tmp.mkdir(parents=True)
    found: Optional[files.StepDir] = None
    stale: list[str] = []
    args = _overrides(tmp, cache, f"train.iters={LONG}", "checkpoint.interval=1", "checkpoint.keep=2",
                      f"checkpoint.async={str(async_save).lower()}", "checkpoint.load=auto")
    for i in range(n):
        mid_save = i % 2 == 1
        delay = rng.uniform(0.0, 0.03) if mid_save else rng.uniform(0.0, max_delay)
        proc = Proc(tmp, args, name=f"killed{i}")
        base = found.step if found is not None else 0
        proc.wait_for(lambda: (latest_step(ck) or files.StepDir(ck / "none")).step > base, "a checkpoint of its own")
        why = "\n".join(log)
        if found is not None:  # it loaded the previous run's latest, and removed that run's temporaries
            assert f"tessera: resumed from {found.path} at step {found.step}" in proc.stdout, why + proc.stdout[-2000:]
            assert not set(stale) & set(_temporaries(ck)), why
        if mid_save:
            proc.wait_for(lambda: _temporaries(ck), "a save in progress", poll=0.002)
        time.sleep(delay)
        proc.kill()
        found, stale = latest_step(ck), _temporaries(ck)
        named = (ck / "latest").read_text().strip() if (ck / "latest").is_file() else None
        after = "a save began" if mid_save else "its first checkpoint"
        log.append(f"{mode} trial {i}: SIGKILL {delay:.3f} s after {after}"
                   f" -> latest {found.path.name if found else None} (`latest` names {named}), temporaries {stale}, "
                   f"step dirs {_step_dirs(ck)}")
        print(log[-1])
        why = "\n".join(log)
        assert found is not None and found.complete and found.step > base, why
        assert resolve_checkpoint(ck).path == found.path, why
        # `latest` names it, or the one before (killed between the rename and the update of `latest`), or
        # nothing yet (killed right after the first rename)
        assert named in (found.path.name, files.step_name(found.step - 1), None), why
    # the last one resumes in this process and finishes two steps later
    result = train(_cfg(tmp, cache, f"train.iters={found.step + 2}", "checkpoint.load=auto", "checkpoint.interval=1",
                        "checkpoint.keep=2", ck=ck, run=run))
    why = "\n".join(log)
    assert len(result.losses) == 2, why
    assert _temporaries(ck) == [], why + "\nthe killed writers' temporaries are still there after the resume"
    assert latest_step(ck).step == found.step + 2
    assert (ck / "latest").read_text() == files.step_name(found.step + 2) + "\n"
    records = _logged(run)
    assert [r["step"] for r in records][-2:] == [found.step + 1, found.step + 2], why
    # every step any of these runs logged (killed, resumed, repeated) has the uninterrupted run's loss
    reference.check(records, why)


def _seed(default: int) -> int:
    return int(os.environ.get("TESSERA_KILL_SEED", default))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_kill_9_while_saving_every_step_leaves_a_loadable_latest(tmp_path, cache, reference, async_save):
    seed, log = _seed(2024 + async_save), []
    _kill_chain(tmp_path / "chain", cache, reference, 3, async_save, random.Random(seed), 1.0, log)


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_kill_9_while_saving_every_step_many_trials(tmp_path, cache, reference, async_save):
    seed, log = _seed(777 + async_save), []
    rng = random.Random(seed)
    for c in range(5):  # chains of 3, each on a fresh root: a chain stays within one epoch
        _kill_chain(tmp_path / f"chain{c}", cache, reference, 3, async_save, rng, 2.0, log)
    mid = sum("temporaries ['" in line for line in log)
    print(f"seed {seed}: {mid} of {len(log)} kills left a save's temporary directory behind")


class _Crash(BaseException):
    """Stands for the process dying at this point."""


class _FsProxy:
    """`os` for engine/checkpoint/files.py, whose `replace` goes through `hook` first."""

    def __init__(self, hook) -> None:
        self._hook = hook

    def replace(self, src, dst):
        self._hook("replace", Path(dst), lambda: os.replace(src, dst))

    def __getattr__(self, name):
        return getattr(os, name)


def test_a_crash_at_every_point_of_the_publication(tmp_path, good, monkeypatch, load_into_trainer):
    """Die before each file-system operation of `publish` (and halfway through each file it writes): the
    checkpoint root then holds either the old or the new checkpoint as latest, complete, and it loads."""
    src_root, _ = good
    real_write, real_fsync_dir = files._write_durable, files.fsync_dir
    k, finished, ops = 0, False, []
    while True:
        k += 1
        for torn in (False, True):
            if torn and (finished or not ops[k - 1].startswith("write")):
                continue  # only a file being written can be torn
            root = tmp_path / f"crash{k}{'torn' if torn else ''}"
            root.mkdir()
            shutil.copytree(src_root / "step-0000001", root / "step-0000001")
            (root / "latest").write_text("step-0000001\n")
            tmp = files.temp_dir(root, 2, os.getpid(), "0123abcd")
            shutil.copytree(src_root / "step-0000002", tmp, ignore=shutil.ignore_patterns(MARKER, META))
            meta = (src_root / "step-0000002" / META).read_bytes()
            ops: list[str] = []

            def hook(what: str, path: Path, do: Callable[[], None], data: Optional[bytes] = None) -> None:
                ops.append(f"{what} {path.name}")
                if len(ops) == k:
                    if torn and data is not None:  # the process died halfway through this file
                        path.write_bytes(data[: len(data) // 2])
                    raise _Crash()
                do()

            monkeypatch.setattr(files, "_write_durable",
                                lambda p, d: hook("write", Path(p), lambda: real_write(p, d), d))
            monkeypatch.setattr(files, "fsync_dir", lambda p: hook("fsync", Path(p), lambda: real_fsync_dir(p)))
            monkeypatch.setattr(files, "os", _FsProxy(hook))
            try:
                files.publish(tmp, root, 2, meta)
                finished = True
            except _Crash:
                finished = False
            monkeypatch.undo()
            where = f"crash before operation {k} ({ops[-1]}{', torn' if torn else ''}); operations {ops}"
            s = latest_step(root)
            assert s is not None and s.complete, where
            renamed = any(op == "replace step-0000002" for op in ops[:k - 1]) or finished
            assert s.step == (2 if renamed else 1), where
            assert resolve_checkpoint(root).path == s.path, where
            # the next run removes the temporary (its writer is gone: here it has this process's pid, which
            # remove_stale treats as dead, as a new saver does) and loads what `latest` stands for
            files.remove_stale(root)
            assert _temporaries(root) == [], where
            assert load_into_trainer(resolve_checkpoint(root).path)["iteration"] == s.step, where
        if finished:
            break
    assert k >= 8, ops  # marker, metadata, fsyncs, rename, fsync, latest.tmp, rename, fsync


@pytest.mark.parametrize("state", ["latest names a missing dir", "latest names a dir without the marker",
                                   "latest is garbage", "latest is missing", "latest names an older one",
                                   "only a temporary newer than latest"])
def test_latest_after_any_crash_state(tmp_path, good, state):
    """The states a crash (or a crash of the retention rule, which deletes the marker first) can leave."""
    src_root, _ = good
    root = tmp_path / "ck"
    root.mkdir()
    shutil.copytree(src_root / "step-0000001", root / "step-0000001")
    shutil.copytree(src_root / "step-0000002", root / "step-0000002")
    (root / "latest").write_text("step-0000002\n")
    want = "step-0000002"
    if state == "latest names a missing dir":
        (root / "latest").write_text("step-0000009\n")
    elif state == "latest names a dir without the marker":
        shutil.copytree(src_root / "step-0000002", root / "step-0000003", ignore=shutil.ignore_patterns(MARKER))
        (root / "latest").write_text("step-0000003\n")
    elif state == "latest is garbage":
        (root / "latest").write_bytes(b"\xff\xfe\x00step")
    elif state == "latest is missing":
        (root / "latest").unlink()
    elif state == "latest names an older one":  # a crash between the rename and the update of `latest`
        (root / "latest").write_text("step-0000001\n")
    else:
        shutil.copytree(src_root / "step-0000002", files.temp_dir(root, 3, _dead_pid(), "aa"))
    assert latest_step(root).path.name == want
    assert resolve_checkpoint(root).path.name == want


# ----------------------------------------------------------------------------- 2. signals


def _stop_line(err: str, reason: str, ck: Path) -> int:
    lines = [line for line in err.splitlines() if line.startswith("tessera: stopped")]
    assert len(lines) == 1, err[-3000:]
    m = re.fullmatch(rf"tessera: stopped: {reason} at step (\d+)/{LONG}; checkpoint (\S+); continue with "
                     r"checkpoint\.load=auto", lines[0])
    assert m, lines[0]
    step = int(m.group(1))
    assert m.group(2) == str(ck / files.step_name(step)), lines[0]
    return step


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_a_signal_saves_stops_with_75_and_the_run_resumes_exactly(tmp_path, cache, reference, sig):
    ck, run = tmp_path / "ck", tmp_path / "run"
    proc = Proc(tmp_path, _overrides(tmp_path, cache, f"train.iters={LONG}", "checkpoint.interval=0"), name="stopped")
    proc.wait_for(lambda: len(_logged(run)) >= 3, "three steps")
    proc.p.send_signal(getattr(signal, sig))
    assert proc.wait() == EXIT_STOPPED, proc.stderr[-3000:]
    err = proc.stderr
    assert f"tessera: {sig} received: saving a checkpoint after this step, then stopping" in err, err[-3000:]
    step = _stop_line(err, sig, ck)
    assert "Traceback" not in err
    s = latest_step(ck)
    assert s is not None and s.step == step and s.complete and _step_dirs(ck) == [s.path.name]
    assert _temporaries(ck) == []
    assert [r["step"] for r in _logged(run)] == list(range(1, step + 1))
    assert not (run / "model.safetensors").exists()  # a stopped run is not a finished one
    # resume: the run directory is reused and metrics.jsonl appended to
    resumed = _overrides(tmp_path, cache, f"train.iters={step + 2}", "checkpoint.load=auto")
    if sig == "SIGTERM":  # from the command line
        again = Proc(tmp_path, resumed, name="resumed")
        assert again.wait() == 0, again.stderr[-3000:]
        assert f"tessera: resumed from {s.path} at step {step}" in again.stdout
    else:
        train(load_config(str(YAML), resumed))
    records = _logged(run)
    assert [r["step"] for r in records] == list(range(1, step + 3))
    reference.check(records, f"{sig} at step {step}")
    assert latest_step(ck).step == step + 2 and (run / "model.safetensors").is_file()


def test_a_second_sigint_exits_at_once(tmp_path, cache):
    ck, run = tmp_path / "ck", tmp_path / "run"
    proc = Proc(tmp_path, _overrides(tmp_path, cache, f"train.iters={LONG}", "checkpoint.interval=0"), name="twice")
    proc.wait_for(lambda: len(_logged(run)) >= 3, "three steps")
    proc.p.send_signal(signal.SIGINT)
    proc.wait_for(lambda: "SIGINT received" in proc.stderr, "the first SIGINT's message", poll=0.001)
    proc.p.send_signal(signal.SIGINT)
    assert proc.wait() == EXIT_INTERRUPTED, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if re.match("tessera: (interrupted|stopped|error)", line)]
    assert len(lines) == 1 and lines[0].startswith("tessera: interrupted"), proc.stderr[-3000:]
    assert "FAILED" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    s = latest_step(ck)
    assert s is None or s.complete  # it exited while or before saving: whatever is there is whole


_SECOND_SIGINT_IN_SAVE = """
import os, signal, sys
import torch.distributed.checkpoint.filesystem as fs
real = fs._write_item
def write_item(*a, **k):
    os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C arrives while DCP writes the stop's checkpoint
    return real(*a, **k)
fs._write_item = write_item
from engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_sigint_during_the_save_exits_at_once(tmp_path, cache):
    ck, run = tmp_path / "ck", tmp_path / "run"
    proc = Proc(tmp_path, _overrides(tmp_path, cache, f"train.iters={LONG}", "checkpoint.interval=0"), name="insave",
                argv=[sys.executable, "-c", _SECOND_SIGINT_IN_SAVE])
    proc.wait_for(lambda: len(_logged(run)) >= 3, "three steps")
    proc.p.send_signal(signal.SIGINT)
    assert proc.wait() == EXIT_INTERRUPTED, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("tessera: interrupted")], proc.stderr[-3000:]
    assert "FAILED" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert latest_step(ck) is None and _temporaries(ck) == []  # the interrupted save left nothing half written


# ----------------------------------------------------------------------------- 3. time limit


def _time_limited(tmp_path, cache, monkeypatch, interval: int, save_sleep: float) -> tuple[float, str, files.StepDir]:
    """An in-process run with checkpoint.time_limit=0.1 (6 s) whose saves take `save_sleep` s more: (seconds
    from the start of the limit's clock to the end of the stop's save, the RunStopped message, the checkpoint)."""
    from engine.train import stop

    limit = 0.1
    starts, published = [], []
    real_init, real_publish = stop.StopRequest.__init__, manager.publish

    def init(self, *a, **k):
        real_init(self, *a, **k)
        starts.append(self.started)

    def publish(*a, **k):
        time.sleep(save_sleep)  # a slow file system
        out = real_publish(*a, **k)
        published.append(time.monotonic())
        return out

    monkeypatch.setattr(stop.StopRequest, "__init__", init)
    monkeypatch.setattr(manager, "publish", publish)
    with pytest.raises(RunStopped) as e:
        train(_cfg(tmp_path, cache, f"train.iters={LONG}", f"checkpoint.interval={interval}",
                   f"checkpoint.time_limit={limit}"))
    assert e.value.exit_code == EXIT_STOPPED
    s = latest_step(tmp_path / "ck")
    assert s is not None and s.complete and _temporaries(tmp_path / "ck") == []
    assert f"time limit at step {s.step}/{LONG}; checkpoint {s.path}" in str(e.value)
    return published[-1] - starts[0] - 60 * limit, str(e.value), s


def test_time_limit_stops_with_a_checkpoint(tmp_path, cache, monkeypatch):
    """End to end: the limit stops the run with exit 75 and a published checkpoint. (Whether it stops in
    time is a wall-clock property, flaky on a loaded machine: the rule itself is tested with a fake clock.)"""
    _over, _msg, s = _time_limited(tmp_path, cache, monkeypatch, interval=5, save_sleep=0.3)
    assert s.step >= 1  # the clock starts before the model and the data are built: how far it gets varies


def test_time_limit_rule_with_a_fake_clock(monkeypatch):
    """The stop comes at the first step after which the time left is below twice (slowest step + last
    save), so the stop's own save and one more slow step still fit: 60 s budget, 2 s steps, 5 s saves ->
    stop after step 24 (48 s: 12 s left, below 14 s; after step 23, 14 s were left)."""
    from engine.parallel.state import ParallelState
    from engine.train import stop as stop_mod

    clock = [1000.0]
    monkeypatch.setattr(stop_mod.time, "monotonic", lambda: clock[0])
    s = stop_mod.StopRequest(time_limit_minutes=1.0)
    s.last_save_seconds = 5.0
    one = ParallelState.single("cpu")
    stopped_at = None
    for step in range(1, 40):
        clock[0] += 2.0
        if s.check(one, 2.0) is not None:
            stopped_at = (step, clock[0] - 1000.0)
            break
    assert stopped_at == (24, 48.0)
    assert 60.0 - stopped_at[1] >= 2.0 + 5.0  # the save and a step still fit in the budget


# ----------------------------------------------------------------------------- 4. no space left on device


def _enospc_in_dcp(monkeypatch, step: int, seen: list) -> None:
    """DCP's writer raises ENOSPC on the first shard item of the save of `step` (the narrowest write)."""
    real = dcp_fs._write_item

    def write_item(transforms, stream, data, write_item, storage_key, *rest):
        name = str(getattr(stream, "name", ""))
        seen.append(name)
        if f"{os.sep}.step-{step:07d}.tmp-" in name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        return real(transforms, stream, data, write_item, storage_key, *rest)

    monkeypatch.setattr(dcp_fs, "_write_item", write_item)


def _enospc_in_publish(monkeypatch, step: int, file: str) -> None:
    """engine/checkpoint/files.py's durable write of `file` (tessera.json, COMPLETE, latest.tmp) raises
    ENOSPC during the publication of `step`."""
    real = files._write_durable

    def write(path, data):
        path = Path(path)
        if path.name == file and (data == f"{files.step_name(step)}\n".encode() if file == "latest.tmp"
                                  else path.parent.name.startswith(f".step-{step:07d}.tmp-")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, data)

    monkeypatch.setattr(files, "_write_durable", write)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("where", ["shard", "tessera.json", "latest.tmp"])
def test_enospc_in_a_save_mid_run_is_reported_and_training_goes_on(tmp_path, cache, monkeypatch, capsys, reference,
                                                                   async_save, where):
    ck = tmp_path / "ck"
    states = []
    if where == "shard":
        seen: list[str] = []
        _enospc_in_dcp(monkeypatch, 2, seen)
    else:
        _enospc_in_publish(monkeypatch, 2, where)
    real_write = manager.write_pieces

    def write_pieces(path, *a, **k):  # what the next save finds: the failed one left nothing
        states.append((Path(path).name, latest_step(ck).path.name if latest_step(ck) else None, _temporaries(ck),
                       _step_dirs(ck)))
        return real_write(path, *a, **k)

    monkeypatch.setattr(manager, "write_pieces", write_pieces)
    result = train(_cfg(tmp_path, cache, "train.iters=4", "checkpoint.interval=1", "checkpoint.keep=0",
                        f"checkpoint.async={str(async_save).lower()}"))
    err = capsys.readouterr().err
    assert len(result.losses) == 4
    failed = [line for line in err.splitlines() if "FAILED" in line]
    assert len(failed) == 1, err[-3000:]
    assert failed[0].startswith("tessera: checkpoint of step 2 FAILED and was discarded"), failed
    named = where if where != "shard" else "__0_0.distcp"
    assert "No space left on device" in failed[0] and named in failed[0], failed
    # at the save of step 3, `latest` still named step 1, and nothing of step 2 was left
    at3 = [s for s in states if s[0].startswith(".step-0000003.tmp-")]
    assert at3 and at3[0][1:] == ("step-0000001", [], ["step-0000001"]), states
    assert _step_dirs(ck) == ["step-0000001", "step-0000003", "step-0000004"] and _temporaries(ck) == []
    assert latest_step(ck).step == 4
    reference.check([{"step": i + 1, "loss": x} for i, x in enumerate(result.losses)])


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("where", ["shard", "tessera.json", "latest.tmp"])
def test_enospc_in_the_last_save_is_one_checkpoint_error(tmp_path, cache, monkeypatch, capsys, async_save, where):
    ck = tmp_path / "ck"
    if where == "shard":
        _enospc_in_dcp(monkeypatch, 3, [])
    else:
        _enospc_in_publish(monkeypatch, 3, where)
    with pytest.raises(CheckpointError) as e:
        train(_cfg(tmp_path, cache, "train.iters=3", "checkpoint.interval=2",
                   f"checkpoint.async={str(async_save).lower()}"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint of step 3 under {ck} could not be written"), msg
    assert "No space left on device" in msg and (where if where != "shard" else "__0_0.distcp") in msg, msg
    assert e.value.exit_code == 5
    assert latest_step(ck).step == 2 and _step_dirs(ck) == ["step-0000002"] and _temporaries(ck) == []
    assert (ck / "latest").read_text() == "step-0000002\n"
    monkeypatch.undo()
    capsys.readouterr()
    # the previous checkpoint loads: the run resumes from it and finishes
    result = train(_cfg(tmp_path, cache, "train.iters=3", "checkpoint.load=auto"))
    assert len(result.losses) == 1 and latest_step(ck).step == 3


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs (two checkpoints of SMALL fit, a third does not), or a skip where mounting is not allowed."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount(8)")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_full_file_system(tmp_path, cache, capsys, small_tmpfs, load_into_trainer):
    ck = small_tmpfs / "ck"
    with pytest.raises(CheckpointError) as e:
        train(_cfg(tmp_path, cache, "train.iters=4", "checkpoint.interval=1", "checkpoint.keep=0", ck=ck))
    err = capsys.readouterr().err
    published = [line.split()[2] for line in err.splitlines() if line.startswith("tessera: checkpoint /")]
    assert published == [str(ck / "step-0000001"), str(ck / "step-0000002")], err[-3000:]
    failed = [line for line in err.splitlines() if "FAILED" in line]  # the last one is also the error raised
    assert [line.split()[4] for line in failed] == ["3", "4"], err[-3000:]
    # (a real write() that fails names no file: the message names the checkpoint root)
    assert all("OSError: [Errno 28] No space left on device" in line for line in failed), failed
    assert str(e.value).startswith(f"checkpoint of step 4 under {ck} could not be written") \
        and "No space left on device" in str(e.value), str(e.value)
    assert _step_dirs(ck) == ["step-0000001", "step-0000002"] and _temporaries(ck) == []
    assert latest_step(ck).step == 2 and (ck / "latest").read_text() == "step-0000002\n"
    assert load_into_trainer(ck)["iteration"] == 2
    st = os.statvfs(small_tmpfs)
    assert st.f_bfree * st.f_frsize > 512 * 1024  # the failed saves' partial files were removed


# ----------------------------------------------------------------------------- 5. corrupt checkpoints


def _half(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _edit_meta(step_dir: Path, **model) -> None:
    meta = json.loads((step_dir / META).read_text())
    meta["config"]["model"].update(model)
    (step_dir / META).write_text(json.dumps(meta))


def _set_format(step_dir: Path) -> None:
    meta = json.loads((step_dir / META).read_text())
    meta["format"] = "tessera.checkpoint.v0"
    (step_dir / META).write_text(json.dumps(meta))


CORRUPT = {
    # name: (what is done to step-0000002, overrides of the loading run, what the one line says)
    "truncated shard": (lambda d: _half(d / "__0_0.distcp"), [], ["__0_0.distcp", "truncated"]),
    "missing shard": (lambda d: (d / "__0_0.distcp").unlink(), [], ["__0_0.distcp", "missing"]),
    "missing .metadata": (lambda d: (d / ".metadata").unlink(), [], [".metadata", "missing"]),
    "garbage .metadata": (lambda d: (d / ".metadata").write_bytes(os.urandom(300)), [],
                          [".metadata", "cannot be read"]),
    "torn tessera.json": (lambda d: _half(d / META), [], [META, "cannot be read"]),
    "other format": (_set_format, [], ["expected format 'tessera.checkpoint.v1'", "'tessera.checkpoint.v0'"]),
    "other n_layers": (lambda d: None, ["model.n_layers=3"], ["another model", "n_layers: checkpoint 2, here 3"]),
    "other d_model": (lambda d: None, ["model.d_model=48"], ["another model", "d_model: checkpoint 64, here 48"]),
    "missing tensors": (lambda d: _edit_meta(d, n_layers=3), ["model.n_layers=3"],
                        ["does not match this model", "missing", "model/layers.2."]),
    "unexpected tensors": (lambda d: _edit_meta(d, n_layers=1), ["model.n_layers=1"],
                           ["does not match this model", "unexpected", "model/layers.1."]),
    "other shapes": (lambda d: _edit_meta(d, ffn_hidden=96), ["model.ffn_hidden=96"],
                     ["does not match this model", "other shapes", "mlp", "(expected ("]),
    "no marker": (lambda d: (d / MARKER).unlink(), [], ["incomplete", MARKER]),
}


@pytest.mark.parametrize("how", ["explicit", "auto"])
@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_a_corrupt_checkpoint_is_one_clear_error_before_anything_changes(tmp_path, cache, good, capsys, case, how):
    if case == "no marker" and how == "auto":
        pytest.skip("auto never picks an incomplete checkpoint (tested below)")
    src_root, src_run = good
    ck, run = tmp_path / "ck", tmp_path / "run"
    shutil.copytree(src_root, ck)
    shutil.copytree(src_run, run)
    target = ck / "step-0000002"
    corrupt, extra, needles = CORRUPT[case]
    corrupt(target)
    before = (_snapshot(ck), _snapshot(run))
    load = str(target) if how == "explicit" else "auto"
    rc, out, err = _cli(capsys, *_overrides(tmp_path, cache, "train.iters=4", f"checkpoint.load={load}", *extra))
    _one_error_line(rc, err, 5, str(target), *needles)
    assert (_snapshot(ck), _snapshot(run)) == before, "a failed load changed the checkpoint root or the run directory"


def test_a_missing_load_path_and_init_from_errors(tmp_path, cache, good, capsys):
    src_root, _ = good
    rc, _, err = _cli(capsys, *_overrides(tmp_path, cache, "train.iters=2", f"checkpoint.load={tmp_path / 'nope'}"))
    _one_error_line(rc, err, 5, "checkpoint.load", str(tmp_path / "nope"), "no such file")
    bad = tmp_path / "bad"
    shutil.copytree(src_root / "step-0000002", bad / "step-0000002")
    _half(bad / "step-0000002" / "__0_0.distcp")
    rc, _, err = _cli(capsys, *_overrides(tmp_path, cache, "train.iters=2", f"checkpoint.init_from={bad}"))
    _one_error_line(rc, err, 5, str(bad / "step-0000002"), "truncated")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_auto_with_only_incomplete_checkpoints_starts_from_scratch(tmp_path, cache, good, capsys, reference):
    src_root, _ = good
    ck = tmp_path / "ck"
    ck.mkdir()
    shutil.copytree(src_root / "step-0000002", ck / "step-0000002", ignore=shutil.ignore_patterns(MARKER))
    dead = files.temp_dir(ck, 3, _dead_pid(), "00ff")
    shutil.copytree(src_root / "step-0000001", dead)
    rc, out, err = _cli(capsys, *_overrides(tmp_path, cache, "train.iters=2", "checkpoint.load=auto"))
    assert rc == 0, err[-3000:]
    assert f"tessera: checkpoint.load=auto: no checkpoint in {ck} yet, starting from scratch" in out
    assert "resumed" not in out
    records = _logged(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    reference.check(records)
    assert _temporaries(ck) == [] and latest_step(ck).step == 2 and latest_step(ck).complete
    assert "removed 2 unfinished checkpoint(s)" in err  # the dead temporary and the markerless step-0000002


# ----------------------------------------------------------------------------- 6. a root that is not ours


def test_a_checkpoint_dir_holding_other_files_is_refused(tmp_path, cache, capsys):
    ck = tmp_path / "mine"
    ck.mkdir()
    (ck / "notes.txt").write_text("my notes")
    (ck / "step-0000001").mkdir()
    before = _snapshot(ck)
    rc, out, err = _cli(capsys, *_overrides(tmp_path, cache, "train.iters=2", "checkpoint.interval=1", ck=ck))
    _one_error_line(rc, err, RunDirError.exit_code, str(ck), "notes.txt", "choose another directory")
    assert _snapshot(ck) == before
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    rc, out, err = _cli(capsys, *_overrides(tmp_path, cache, "train.iters=2", ck=a_file))
    _one_error_line(rc, err, 6, str(a_file), "found a file")
    assert a_file.read_text() == "x"


# ----------------------------------------------------------------------------- 7. retention


def test_retention_keeps_the_last_and_every_nth(tmp_path, cache, monkeypatch):
    ck = tmp_path / "ck"
    real = manager.retain
    seen = []

    def retain(root, keep, keep_every):
        removed = real(root, keep, keep_every)
        named = (Path(root) / "latest").read_text().strip()
        seen.append((named, [p.name for p in removed], _step_dirs(root)))
        assert (Path(root) / named / MARKER).is_file() and named not in [p.name for p in removed], seen
        return removed

    monkeypatch.setattr(manager, "retain", retain)
    train(_cfg(tmp_path, cache, "train.iters=8", "checkpoint.interval=1", "checkpoint.keep=2",
               "checkpoint.keep_every=3"))
    assert _step_dirs(ck) == ["step-0000003", "step-0000006", "step-0000007", "step-0000008"], seen
    assert [s.step for s in complete_steps(ck)] == [3, 6, 7, 8] and latest_step(ck).step == 8
    assert [n for n, _, _ in seen] == [files.step_name(i) for i in range(1, 9)]
    assert [r for _, r, _ in seen] == [[], [], ["step-0000001"], ["step-0000002"], [], ["step-0000004"],
                                       ["step-0000005"], []], seen


def test_retention_never_deletes_what_latest_names(tmp_path):
    root = tmp_path / "ck"
    root.mkdir()
    for i in range(1, 6):
        d = root / files.step_name(i)
        d.mkdir()
        (d / META).write_text("{}")
        (d / MARKER).write_text(f"{i}\n")
    (root / "latest").write_text("step-0000002\n")  # named by hand (or left so by a crash)
    removed = files.retain(root, keep=1, keep_every=0)
    assert sorted(p.name for p in removed) == ["step-0000001", "step-0000003", "step-0000004"]
    assert _step_dirs(root) == ["step-0000002", "step-0000005"]
    assert files.retain(root, keep=0, keep_every=0) == []  # keep=0 keeps everything
