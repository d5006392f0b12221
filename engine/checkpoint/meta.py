"""tessera.json: the small JSON record in every checkpoint (iteration, layout, config, engine, lineage).

Written by the Trainer's checkpointing (engine/train/checkpointing.py); read here by everything that opens
a checkpoint (resume, init_from, inspect, export, generate), which checks the format first.
"""

from __future__ import annotations

import json

from engine import __version__
from engine.checkpoint.files import META, StepDir
from engine.errors import CheckpointError

__all__ = ["FORMAT", "read_meta"]

FORMAT = "tessera.checkpoint.v1"


def read_meta(step: StepDir, what: str = "checkpoint") -> dict:
    """tessera.json of a checkpoint, checked for a format this engine reads."""
    try:
        meta = json.loads((step.path / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what} {str(step.path)!r}: {META} cannot be read ({e})") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT:
        engine = meta.get("engine", "?") if isinstance(meta, dict) else "?"
        raise CheckpointError(f"{what} {str(step.path)!r}: expected format {FORMAT!r}, found {fmt!r} (written by "
                              f"tessera {engine}; this is tessera {__version__})")
    return meta
