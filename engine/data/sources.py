"""Raw document sources: `builtin:pydoc`, plain text and JSONL files, optionally gzip/zstd compressed.

Every reader is a generator of documents (str), streaming the file so memory stays flat in its size.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Iterator, Literal, TextIO

BUILTIN_PYDOC = "builtin:pydoc"
TextMode = Literal["blank", "line"]  # one document per blank-line-separated block, or per line


class SourceError(ValueError):
    """An input file is missing, unreadable or not in the expected format."""


def is_raw_source(path: str) -> bool:
    """True for inputs that need preprocessing (text/jsonl/builtin), False for a Megatron .bin/.idx prefix."""
    if path == BUILTIN_PYDOC:
        return True
    p = Path(path)
    if Path(path + ".idx").is_file() and Path(path + ".bin").is_file():
        return False
    return p.is_file()


def source_name(path: str) -> str:
    """A short name for metrics: 'pydoc' for builtin:pydoc, else the file name without data extensions."""
    if path == BUILTIN_PYDOC:
        return "pydoc"
    name = Path(path).name
    for ext in (".gz", ".zst", ".jsonl", ".json", ".txt", ".bin", ".idx"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return name or "data"


def _open_text(path: Path) -> TextIO:
    """Open a possibly compressed file as UTF-8 text (invalid bytes replaced, so one bad byte never stops a run)."""
    if not path.is_file():
        raise SourceError(f"input file {str(path)!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    if head == b"\x28\xb5\x2f\xfd":
        try:
            import zstandard
        except ImportError:
            raise SourceError(f"input file {str(path)!r} is zstd-compressed; install the zstandard package") from None
        raw = open(path, "rb")
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), encoding="utf-8",
                                errors="replace")
    return open(path, "r", encoding="utf-8", errors="replace")


def _is_jsonl(path: Path) -> bool:
    name = path.name
    for ext in (".gz", ".zst"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return name.endswith((".jsonl", ".json"))


def iter_pydoc() -> Iterator[str]:
    """CPython's English documentation topics (~79 documents, ~465k chars), in sorted key order."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def iter_text(path: Path, mode: TextMode = "blank") -> Iterator[str]:
    with _open_text(path) as f:
        if mode == "line":
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    yield line
            return
        block: list[str] = []
        for line in f:
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).rstrip("\n")
                block = []
        if block:
            yield "".join(block).rstrip("\n")


def iter_jsonl(path: Path, key: str = "text") -> Iterator[str]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}:{lineno}: expected one JSON object per line, found invalid JSON "
                                  f"({e.msg})") from None
            if not isinstance(obj, dict) or key not in obj:
                found = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
                raise SourceError(f"{path}:{lineno}: expected a JSON object with key {key!r}, found {found}")
            text = obj[key]
            if not isinstance(text, str):
                raise SourceError(f"{path}:{lineno}: expected a string under {key!r}, found "
                                  f"{type(text).__name__}")
            yield text


def iter_documents(path: str, text_mode: TextMode = "blank", json_key: str = "text") -> Iterator[str]:
    """Documents of one input: builtin:pydoc, *.jsonl[.gz|.zst] (by key), or text (by blank line or line)."""
    if path == BUILTIN_PYDOC:
        yield from iter_pydoc()
        return
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"input file {path!r} does not exist")
    if _is_jsonl(p):
        yield from iter_jsonl(p, json_key)
    else:
        yield from iter_text(p, text_mode)
