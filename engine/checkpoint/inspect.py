"""`tessera checkpoint inspect`: what a checkpoint holds, read from its index and tessera.json only.

Nothing is loaded: the tensor list comes from DCP's `.metadata` (names, global shapes, dtypes, chunks) and
the rest from tessera.json, so inspecting a checkpoint of any size is instant and needs no GPU.

A step directory without the COMPLETE marker (a save that did not finish, or a copy missing it) is never
loaded by training, export or generate, but it is shown here -- marked incomplete, with whatever it still
holds -- because "what is in this directory and why is it not loadable" is the question inspect answers.
Problems found on the way (no tessera.json, an unreadable index, a missing or truncated shard, a format
this engine does not read) are listed rather than raised, for the same reason.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from engine.checkpoint.dcp_io import check_files, read_metadata, tensor_infos
from engine.checkpoint.files import MARKER, META, StepDir, resolve_checkpoint
from engine.config import dump_yaml
from engine.errors import CheckpointError
from engine.checkpoint.meta import FORMAT

__all__ = ["describe", "find_step", "render_text"]

# groups of keys (engine/train/checkpointing.py names them); anything else is "other"
_GROUPS = (("model/", "model"), ("optim/", "optimizer"), ("rng/", "rng"), ("fp8/", "fp8"))


def find_step(path: str | os.PathLike) -> StepDir:
    """The step directory a user's path means. A step directory is taken as it is, complete or not (so an
    incomplete one can be shown); a checkpoint root means the one its `latest` names. Anything else (no
    such path, a file, a directory holding no checkpoint) is a CheckpointError naming the path."""
    p = Path(path)
    s = StepDir(p)
    if p.is_dir() and ((p / META).exists() or (p / ".metadata").exists() or s.step >= 0):
        return s
    return resolve_checkpoint(p, "checkpoint")


def _group(name: str) -> str:
    return next((g for prefix, g in _GROUPS if name.startswith(prefix)), "other")


def _without_path(message: str, step: StepDir) -> str:
    """An error of dcp_io without its leading `checkpoint '<path>': ` (the header already names the path)."""
    prefix = f"checkpoint {str(step.path)!r}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _read_meta(step: StepDir, problems: list[str]) -> Optional[dict]:
    """tessera.json as it is (any format: inspect shows it and says what is wrong), or None."""
    f = step.path / META
    if not f.is_file():
        problems.append(f"no {META} (iteration, layout and config are unknown)")
        return None
    try:
        meta = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{META} cannot be read ({e})")
        return None
    if not isinstance(meta, dict):
        problems.append(f"{META}: expected a JSON object, found {type(meta).__name__}")
        return None
    if meta.get("format") != FORMAT:
        problems.append(f"{META}: expected format {FORMAT!r}, found {meta.get('format')!r} (written by tessera "
                        f"{meta.get('engine', '?')})")
    return meta


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Everything inspect shows, as JSON-ready data: path, step, complete, loadable, iteration, layout,
    engine, format, saved_at, lineage, config, tensors [{name, shape, dtype, nbytes, chunks}], total_bytes,
    bytes per group (model / optimizer / rng / fp8 / other), the shard files with their sizes, and problems."""
    given = Path(path)
    step = find_step(given)
    problems: list[str] = []
    complete = step.complete
    if not (step.path / MARKER).is_file():
        problems.append(f"no {MARKER} marker: its save did not finish; it is never loaded")
    meta = _read_meta(step, problems)
    tensors: list[dict[str, Any]] = []
    groups = {g: 0 for _, g in _GROUPS} | {"other": 0}
    try:
        md = read_metadata(step.path)
    except CheckpointError as e:
        problems.append(_without_path(str(e), step))
        md = None
    if md is not None:
        chunks = {n: len(getattr(m, "chunks", ())) for n, m in md.state_dict_metadata.items()}
        for name, info in sorted(tensor_infos(md).items()):
            tensors.append({"name": name, "shape": list(info.shape), "dtype": str(info.dtype).removeprefix("torch."),
                            "nbytes": info.nbytes, "chunks": chunks.get(name, 0)})
            groups[_group(name)] += info.nbytes
        skipped = sorted(set(md.state_dict_metadata) - {t["name"] for t in tensors})
        if skipped:
            problems.append(f"{len(skipped)} entr{'y is' if len(skipped) == 1 else 'ies are'} not tensors "
                            f"({', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''})")
        try:
            check_files(step.path, md)
        except CheckpointError as e:
            problems.append(_without_path(str(e), step))
    files = {p.name: p.stat().st_size for p in sorted(step.path.iterdir()) if p.is_file()}
    meta = meta or {}
    return {
        "path": str(step.path),
        "given": str(given),  # a checkpoint root resolves to the step directory its `latest` names
        "step": step.step if step.step >= 0 else None,
        "complete": complete,
        "loadable": complete and not problems,
        "iteration": meta.get("iteration"),
        "layout": meta.get("layout"),
        "engine": meta.get("engine"),
        "format": meta.get("format"),
        "saved_at": meta.get("saved_at"),
        "consumed_samples": meta.get("consumed_samples"),
        "has_optimizer": meta.get("has_optimizer"),
        "lineage": meta.get("lineage"),
        "config": meta.get("config"),
        "tensors": tensors,
        "total_bytes": sum(groups.values()),
        "bytes": {g: n for g, n in groups.items() if n or g not in ("other", "fp8")},  # fp8: FP8 runs only
        "files": files,
        "disk_bytes": sum(files.values()),
        "problems": problems,
    }


def _size(n: int) -> str:
    """Bytes for people: `1,234,567 bytes (1.2 MiB)`."""
    value, unit = float(n), "B"
    for u in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, u
    return f"{n:,} bytes" + (f" ({value:.1f} {unit})" if unit != "B" else "")


def _layout_text(layout: Optional[dict]) -> str:
    if not layout:
        return "unknown"
    main = ", ".join(f"{k} {layout[k]}" for k in ("tp", "pp", "vpp", "dp", "zero") if k in layout)
    extra = []
    if "world_size" in layout:
        extra.append(f"world size {layout['world_size']}")
    if layout.get("sequence_parallel"):
        extra.append("sequence parallel")
    if layout.get("pp_layout"):
        extra.append(f"pp_layout {layout['pp_layout']}")
    extra += [f"{k} {v}" for k, v in layout.items()
              if k not in ("tp", "pp", "vpp", "dp", "zero", "world_size", "sequence_parallel", "pp_layout")]
    return ", ".join([main] + extra) if main else ", ".join(extra)


def _lineage_lines(lineage: Optional[list]) -> list[str]:
    if lineage is None:
        return ["unknown"]
    if not lineage:
        return ["none (trained from scratch)"]
    out = []
    for item in lineage:
        if isinstance(item, dict):
            kind = {"resume": "resumed from", "init_from": "weights from",
                    "from_hf": "converted from the Hugging Face model"}.get(item.get("kind"), item.get("kind"))
            took = [name for key, name in (("reset_optimizer", "optimizer state"), ("reset_schedule", "schedule"),
                                           ("reset_data", "data position")) if item.get(key) is False]
            at = [f"{k.replace('start_', 'starting at ').replace('_', ' ')} {item[k]}"
                  for k in ("start_iteration", "start_consumed_samples") if item.get(k)]
            extra = "".join(f"; {x}" for x in ([f"also its {', '.join(took)}"] if took else []) + at)
            out.append(f"{kind} {item.get('path')} (step {item.get('iteration')}{extra})")
        else:
            out.append(str(item))
    return out


def render_text(d: dict[str, Any]) -> str:
    """The human-readable form of `describe`'s result."""
    state = "complete" if d["complete"] else "INCOMPLETE (no COMPLETE marker: never loaded)"
    lines = [f"checkpoint {d['path']}: {state}"]
    if d["given"] != d["path"]:
        lines.append(f"  (named by `latest` in {d['given']})")

    def row(key: str, value: Any) -> None:
        lines.append(f"  {key:<14}{value}")

    row("iteration", d["iteration"] if d["iteration"] is not None else "unknown")
    row("saved at", d["saved_at"] or "unknown")
    row("engine", f"tessera {d['engine']} (format {d['format']})" if d["engine"] else "unknown")
    row("layout", _layout_text(d["layout"]))
    lineage = _lineage_lines(d["lineage"])
    row("lineage", lineage[0])
    for more in lineage[1:]:
        row("", more)
    row("size", _size(d["total_bytes"]) + " of tensors")
    for g, n in d["bytes"].items():
        row("", f"{g + ':':<11}{_size(n)}")
    row("on disk", f"{_size(d['disk_bytes'])} in {len(d['files'])} files")
    if d["problems"]:
        lines.append("problems:")
        lines += [f"  - {p}" for p in d["problems"]]
    lines.append(f"tensors ({len(d['tensors'])}):")
    if d["tensors"]:
        width = max(len(t["name"]) for t in d["tensors"])
        shapes = [f"[{', '.join(map(str, t['shape']))}]" for t in d["tensors"]]
        sw = max(len(s) for s in shapes)
        for t, s in zip(d["tensors"], shapes):
            lines.append(f"  {t['name']:<{width}}  {s:<{sw}}  {t['dtype']:<9} {t['nbytes']:>14,} B  "
                         f"{t['chunks']} chunk{'' if t['chunks'] == 1 else 's'}")
    lines.append("config:")
    if d["config"] is None:
        lines.append("  unknown")
    else:
        lines += ["  " + ln for ln in dump_yaml(d["config"]).splitlines()]
    return "\n".join(lines) + "\n"
