"""The checkpoint directory on disk: names, completion, `latest`, retention. File system only (no torch).

    DIR/
      step-0000120/            one complete checkpoint
        __0_0.distcp ...       torch.distributed.checkpoint shards (each rank writes what it holds)
        .metadata              DCP's index of every tensor chunk
        tessera.json           iteration, layout saved with, resolved config, engine version, lineage
        COMPLETE               written last, inside the temporary directory, before the rename
      .step-0000140.tmp-<id>/  a save in progress (or one that died: removed when its writer is gone)
      latest                   "step-0000120\n": replaced by atomic rename once that directory is complete

A checkpoint is written into a temporary directory; every file and the directory are fsynced; the marker
is written and fsynced; the directory is renamed to `step-NNNNNNN`, the parent fsynced; only then is
`latest` replaced (write `latest.tmp`, fsync, rename, fsync the parent). So a crash at any moment leaves
`latest` naming a complete checkpoint (or nothing), and a directory without the marker is never loaded.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Optional

from engine.errors import CheckpointError, RunDirError

__all__ = ["LATEST", "MARKER", "META", "StepDir", "check_checkpoint_dir", "complete_steps", "ensure_checkpoint_dir",
           "fsync_dir", "fsync_file", "latest_step", "pid_alive", "publish", "remove_stale", "resolve_checkpoint",
           "retain", "step_name", "temp_dir"]

MARKER = "COMPLETE"
META = "tessera.json"
LATEST = "latest"
_STEP_RE = re.compile(r"^step-(\d{7,})$")
_TMP_RE = re.compile(r"^\.step-(\d{7,})\.tmp-(\d+)-[0-9a-f]+$")
# what a checkpoint root may hold besides step directories and temporaries (ours: a root we write)
_OURS = {LATEST, f"{LATEST}.tmp", ".tessera-checkpoints"}


class StepDir(os.PathLike):
    """One `step-NNNNNNN` directory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        m = _STEP_RE.match(self.path.name)
        self.step = int(m.group(1)) if m else -1

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def complete(self) -> bool:
        return (self.path / MARKER).is_file() and (self.path / META).is_file()

    def __repr__(self) -> str:
        return f"StepDir({str(self.path)!r})"


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def temp_dir(root: Path, step: int, pid: int, token: str) -> Path:
    """The directory a save of `step` writes into before it is complete (the publishing process's pid, so a
    dead writer's leftovers can be told from a live one's, and a per-run token)."""
    return Path(root) / f".step-{step:07d}.tmp-{pid}-{token}"


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files, renames) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """`data` as `path`, whole or not at all: written to `.<name>.tmp<pid>`, fsynced, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _write_durable(tmp, data)
    os.replace(tmp, path)


def complete_steps(root: Path) -> list[StepDir]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [StepDir(p) for p in root.iterdir() if _STEP_RE.match(p.name) and p.is_dir()]
    return sorted((s for s in found if s.complete), key=lambda s: s.step)


def _named(root: Path) -> Optional[StepDir]:
    """The directory the `latest` file names (complete or not), if it names one."""
    try:
        text = (Path(root) / LATEST).read_text().strip()
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None
    return StepDir(Path(root) / text) if _STEP_RE.match(text) else None


def latest_step(root: Path) -> Optional[StepDir]:
    """The checkpoint `latest` names, if it is complete; else the newest complete one (a crash between the
    rename and the update of `latest` leaves a newer complete directory); None if there is none."""
    root = Path(root)
    named = _named(root)
    done = complete_steps(root)
    newest = done[-1] if done else None
    if named is not None and named.complete and (newest is None or named.step >= newest.step):
        return named
    return newest


def resolve_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> StepDir:
    """A path given by the user (`checkpoint.load`, `init_from`, `inspect`, `export`, `generate`): one
    `step-NNNNNNN/` directory, or a checkpoint root meaning the one its `latest` names."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{what} {str(p)!r}: no such file or directory")
    if not p.is_dir():
        raise CheckpointError(f"{what} {str(p)!r}: expected a checkpoint directory (step-NNNNNNN/ or a "
                              f"checkpoint root holding `latest`), found a file")
    if (p / META).exists() or (p / ".metadata").exists() or _STEP_RE.match(p.name):
        s = StepDir(p)
        if not s.complete:
            raise CheckpointError(f"{what} {str(p)!r} is incomplete (no {MARKER} marker: its save did not finish); "
                                  f"load an earlier checkpoint")
        return s
    s = latest_step(p)
    if s is None:
        raise CheckpointError(f"{what} {str(p)!r}: expected a step-NNNNNNN/ checkpoint or a checkpoint root "
                              f"holding one, found none")
    return s


def check_checkpoint_dir(root: Path) -> None:
    """Read-only: `root` may be used as checkpoint.dir (absent, or a directory holding only checkpoints: one
    holding files that are not ours is refused, never written into; or its parent is writable)."""
    root = Path(root)
    if not root.exists():
        parent = next((p for p in root.absolute().parents if p.exists()), None)
        if parent is None or not os.access(parent, os.W_OK | os.X_OK):
            raise RunDirError(f"checkpoint.dir {str(root)!r}: cannot create it ({parent} is not writable)")
        return
    _check_existing(root)


def ensure_checkpoint_dir(root: Path) -> None:
    """Create `root`, or check that an existing one holds only checkpoints (a directory holding files that
    are not ours is refused, never written into). Read-only when it exists."""
    root = Path(root)
    if root.exists():
        _check_existing(root)
        return
    root.mkdir(parents=True, exist_ok=True)
    (root / ".tessera-checkpoints").touch()


def _check_existing(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise RunDirError(f"checkpoint.dir {str(root)!r}: expected a directory, found a file")
    if root.is_dir():
        foreign = sorted(n for n in os.listdir(root)
                         if not (_STEP_RE.match(n) or _TMP_RE.match(n) or n in _OURS))
        if foreign:
            shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
            raise RunDirError(f"checkpoint.dir {str(root)!r}: expected a new, empty or Tessera checkpoint directory, "
                              f"found other files ({shown}); choose another directory")
        if not os.access(root, os.W_OK | os.X_OK):
            raise RunDirError(f"checkpoint.dir {str(root)!r}: the directory is not writable")


def publish(tmp: Path, root: Path, step: int, meta: bytes) -> StepDir:
    """Finish a save whose shards are in `tmp` (already fsynced by their writers): write the metadata and the
    marker, rename the directory to step-NNNNNNN, then point `latest` at it. Rank 0 only."""
    _write_durable(tmp / META, meta)
    _write_durable(tmp / MARKER, f"{step}\n".encode())
    fsync_dir(tmp)
    final = Path(root) / step_name(step)
    if final.exists():  # a checkpoint of the same step from an earlier attempt: the new one replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)
    try:
        fsync_dir(Path(root))
        tmp_latest = Path(root) / f"{LATEST}.tmp"
        _write_durable(tmp_latest, f"{final.name}\n".encode())
        os.replace(tmp_latest, Path(root) / LATEST)
        fsync_dir(Path(root))
    except Exception:
        # an error (e.g. no space left for `latest`), not a crash: the save is reported as failed, so it
        # must not be found as the newest complete checkpoint either (marker first, as in `retain`)
        (final / MARKER).unlink(missing_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        raise
    return StepDir(final)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this host): a temporary file's writer may still be at it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(root: Path, keep_tmp: Iterable[Path] = ()) -> list[Path]:
    """Delete temporary directories of saves whose writer process is gone (a crash mid-save), and
    step directories without the marker (a deletion that was interrupted). Returns them."""
    root = Path(root)
    if not root.is_dir():
        return []
    keep = {Path(p).resolve() for p in keep_tmp}
    removed = []
    for p in root.iterdir():
        m = _TMP_RE.match(p.name)
        if m and p.resolve() not in keep and (int(m.group(2)) == os.getpid() or not pid_alive(int(m.group(2)))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif _STEP_RE.match(p.name) and p.is_dir() and not (p / MARKER).is_file():
            # a step directory is renamed into place with its marker; without one it is what a deletion
            # (retention: marker first) or a failed publication left half-removed
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def retain(root: Path, keep: int, keep_every: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep` (0 = keep all), except every `keep_every`-th step
    and the one `latest` names. Returns what was deleted."""
    if keep <= 0:
        return []
    done = complete_steps(root)
    protected = {s.path for s in done[-keep:]}
    for s in (latest_step(root), _named(root)):  # `latest` may name an older one than latest_step finds
        if s is not None:
            protected.add(s.path)
    removed = []
    for s in done:
        if s.path in protected or (keep_every and s.step % keep_every == 0):
            continue
        # the marker goes first: a half-deleted directory is then never mistaken for a checkpoint
        (s.path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(s.path, ignore_errors=True)
        removed.append(s.path)
    return removed
