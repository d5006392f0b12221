"""Raw document sources: `builtin:pydoc`, `builtin:stdlib`, plain text and JSONL files, optionally gzip/zstd
compressed.

Every reader is a generator of documents (str), streaming the file so memory stays flat in its size. A file
that is not text (a .bin/.idx, an image, an unknown compression: NUL bytes or mostly invalid UTF-8 in its first
64 KiB), or a truncated/corrupt .gz/.zst (also deep inside) raises SourceError naming it, instead of being
trained on as text or failing with a zlib/zstd traceback.
"""

from __future__ import annotations

import codecs
import gzip
import importlib.util
import io
import json
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Literal, Optional

from engine.errors import DataError

BUILTIN_PYDOC = "builtin:pydoc"
BUILTIN_STDLIB = "builtin:stdlib"
BUILTINS = (BUILTIN_PYDOC, BUILTIN_STDLIB)  # corpora that ship with every CPython: no file, no download
TextMode = Literal["blank", "line"]  # one document per blank-line-separated block, or per line

SNIFF_BYTES = 64 << 10     # the first 64 KiB (after decompression) decide whether a file is text
BINARY_SHARE = 0.30        # ... binary when this share of them is invalid UTF-8 or control bytes (or any NUL)
_CONTROL = bytes(range(1, 9)) + bytes(range(14, 32)) + b"\x7f"   # not \t \n \v \f \r
_ESCAPED = re.compile("[\udc80-\udcff]")  # invalid bytes, as decoded with errors="surrogateescape"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class SourceError(DataError):
    """An input file is missing, unreadable or not in the expected format."""


def _megatron_prefix(path: Path) -> Optional[str]:
    """'d' for 'd.bin' / 'd.idx' (the file of a Megatron dataset given instead of its prefix), else None."""
    if path.suffix in (".bin", ".idx"):
        return str(path.with_suffix(""))
    return None


def is_raw_source(path: str) -> bool:
    """True for inputs that need preprocessing (text/jsonl/builtin), False for a Megatron .bin/.idx prefix
    -- and False for the .bin or .idx file of one (PREFIX.bin with PREFIX.idx beside it): that is no text."""
    if path in BUILTINS:
        return True
    p = Path(path)
    if Path(path + ".idx").is_file() and Path(path + ".bin").is_file():
        return False
    prefix = _megatron_prefix(p)
    if prefix is not None and Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file():
        return False
    return p.is_file()


def source_name(path: str) -> str:
    """A short name for metrics: 'pydoc' / 'stdlib' for the builtins, else the file name without data extensions."""
    if path in BUILTINS:
        return path[len("builtin:"):]
    name = Path(path).name
    for ext in (".gz", ".zst", ".jsonl", ".json", ".txt", ".bin", ".idx"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return name or "data"


# --------------------------------------------------------------------------- decompression, errors as SourceError


class _ZstdRaw(io.RawIOBase):
    """A zstd stream (one or more frames) that raises EOFError when the input ends inside a frame.

    (zstandard's stream_reader returns what it could decode and then b"": a truncated file read as complete.)
    """

    def __init__(self, f: BinaryIO):
        import zstandard

        self._f = f
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._fed = False   # the current frame has received input
        self._out = b""      # decompressed bytes not yet returned: self._out[self._pos:]
        self._pos = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # noqa: ANN001 - RawIOBase protocol
        while self._pos >= len(self._out) and not self._done:
            chunk = self._f.read(1 << 16)  # small input chunks: zstd can expand them a lot
            if not chunk:
                if self._fed:
                    raise EOFError("the input ended inside a zstd frame")
                self._done = True
                break
            parts = []
            while chunk:
                self._fed = True
                parts.append(self._obj.decompress(chunk))
                chunk = b""
                if self._obj.eof:  # a frame ended: the rest of the input starts the next one
                    chunk = self._obj.unused_data
                    self._obj = self._dctx.decompressobj()
                    self._fed = False
            self._out, self._pos = b"".join(parts), 0
        n = min(len(b), len(self._out) - self._pos)
        b[:n] = memoryview(self._out)[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


class _Guarded(io.RawIOBase):
    """The decompressed bytes of one file; decompression errors become a SourceError naming the file."""

    def __init__(self, path: Path):
        self.path = path
        self.nbytes = 0
        with open(path, "rb") as f:
            head = f.read(4)
        self.compression = "gzip" if head[:2] == b"\x1f\x8b" else "zstd" if head == _ZSTD_MAGIC else None
        raw = open(path, "rb")
        try:
            if self.compression == "gzip":
                self._inner: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
                self._raw = raw
            elif self.compression == "zstd":
                if importlib.util.find_spec("zstandard") is None:
                    raise SourceError(f"input file {str(path)!r} is zstd-compressed; install the zstandard "
                                      f"package")
                self._inner = _ZstdRaw(raw)  # type: ignore[assignment]
                self._raw = raw
            else:
                self._inner, self._raw = raw, raw
        except BaseException:
            raw.close()
            raise

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # noqa: ANN001
        try:
            n = self._inner.readinto(b)  # type: ignore[attr-defined]
        except EOFError:
            raise SourceError(f"input file {str(self.path)!r} ends early: the compressed stream is truncated "
                              f"(expected the end of the {self.compression} stream, found the end of the file after "
                              f"{self.nbytes} decompressed bytes)") from None
        except (zlib.error, gzip.BadGzipFile) as e:
            raise SourceError(f"input file {str(self.path)!r} is corrupt: expected a valid gzip stream, found an "
                              f"error after {self.nbytes} decompressed bytes ({e})") from None
        except Exception as e:
            if type(e).__name__ == "ZstdError":
                raise SourceError(f"input file {str(self.path)!r} is corrupt: expected a valid zstd stream, found "
                                  f"an error after {self.nbytes} decompressed bytes ({e})") from None
            raise
        self.nbytes += n or 0
        return n

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._raw.close()
            super().close()


def _not_text(path: Path, why: str) -> SourceError:
    msg = f"input file {str(path)!r} looks binary, not text ({why}); expected UTF-8 text or JSONL"
    prefix = _megatron_prefix(path)
    if prefix is not None:
        msg += (f"; a Megatron .bin/.idx dataset is given by its prefix without extension ({prefix!r}), not by its "
                f"{path.suffix} file")
    return SourceError(msg)


def _binary_reason(head: bytes, complete: bool) -> Optional[str]:
    """Why `head` (the first bytes of a file) is not text, or None. complete: it is the whole file."""
    if not head:
        return None
    if b"\x00" in head:
        return f"NUL bytes in its first {len(head)} bytes"
    text = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode(head, final=complete)
    invalid = len(_ESCAPED.findall(text))
    control = len(head) - len(head.translate(None, _CONTROL))
    if invalid + control > BINARY_SHARE * len(head):
        return (f"{invalid} invalid UTF-8 and {control} control bytes in its first {len(head)} bytes, expected "
                f"at most {BINARY_SHARE:.0%}")
    return None


def check_text_file(path: str | Path) -> None:
    """Raise SourceError unless PATH exists and its first 64 KiB (decompressed) look like text. Only reads.
    builtin:stdlib: unless this Python has standard-library sources to read (builtin:pydoc always does)."""
    if path == BUILTIN_STDLIB:
        check_stdlib()
        return
    if path == BUILTIN_PYDOC:
        return
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"input file {str(p)!r} does not exist")
    with _Guarded(p) as g:
        head = io.BufferedReader(g).read(SNIFF_BYTES)
        complete = len(head) < SNIFF_BYTES
    why = _binary_reason(head, complete)
    if why is not None:
        raise _not_text(p, why)


@dataclass
class SourceReport:
    """What reading one input found: decompressed bytes read, invalid UTF-8 bytes replaced by U+FFFD."""

    path: str
    bytes_read: int = 0
    invalid_bytes: int = 0


class _TextLines:
    """Lines of a (possibly compressed) UTF-8 file. Invalid bytes become U+FFFD (one per byte), counted in the
    report, so one bad byte never stops a run; a file that is mostly invalid is refused as binary."""

    def __init__(self, path: Path, report: Optional[SourceReport] = None):
        check_text_file(path)
        self.path = path
        self.report = report if report is not None else SourceReport(str(path))
        self._raw = _Guarded(path)
        self._text = io.TextIOWrapper(io.BufferedReader(self._raw), encoding="utf-8", errors="surrogateescape")

    def __iter__(self) -> Iterator[str]:
        rep = self.report
        for line in self._text:
            if not line.isascii():
                try:
                    line.encode("utf-8")  # fast C check: lone surrogates (escaped invalid bytes) do not encode
                except UnicodeEncodeError:
                    line, n = _ESCAPED.subn("\ufffd", line)
                    rep.invalid_bytes += n
            yield line
        rep.bytes_read = self._raw.nbytes
        if rep.invalid_bytes > BINARY_SHARE * max(rep.bytes_read, 1):
            raise _not_text(self.path, f"{rep.invalid_bytes} of its {rep.bytes_read} bytes are invalid UTF-8")

    def __enter__(self) -> "_TextLines":
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self._text.close()


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


STDLIB_MAX_CHARS = 3_000_000  # builtin:stdlib's cap: ~3 MB keeps its preprocessing to seconds
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                     "pydoc_data"}  # installed packages, test suites, and builtin:pydoc's own text


def stdlib_dir() -> Path:
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Optional[Path] = None, max_chars: int = STDLIB_MAX_CHARS) -> list[Path]:
    """The .py files builtin:stdlib reads: every .py under ROOT (default: this Python's stdlib directory) by
    sorted relative path, without site-packages, test suites (test/, tests/, idle_test/, test_*.py) and
    pydoc_data; when their total size is above max_chars bytes, every k-th of them (k = ceil(total /
    max_chars)), so the selection spans the whole library. Depends only on the files, not on listing order."""
    root = stdlib_dir() if root is None else root
    if not root.is_dir():
        return []
    files = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root)
        if (_STDLIB_SKIP_DIRS.intersection(rel.parts[:-1]) or rel.parts[0].startswith("config-")
                or rel.name.startswith("test_") or not f.is_file()):
            continue
        files.append((rel.as_posix(), f))
    files.sort()
    total = sum(f.stat().st_size for _, f in files)
    stride = max(1, -(-total // max(max_chars, 1)))
    return [f for _, f in files[::stride]]


def check_stdlib(root: Optional[Path] = None) -> None:
    """Raise SourceError unless builtin:stdlib has something to read (a Python installed without its .py
    sources, e.g. a zipped or frozen standard library, has not)."""
    root = stdlib_dir() if root is None else root
    if not stdlib_files(root):
        raise SourceError(f"builtin:stdlib: expected the standard library's .py sources under {str(root)!r} "
                          f"(sysconfig's 'stdlib' path), found none; this Python ships its standard library "
                          f"without sources: use a text/jsonl file instead")


def stdlib_identity() -> dict:
    """What builtin:stdlib's documents depend on (for the preprocessing cache key)."""
    return {"stdlib": sys.version, "dir": str(stdlib_dir()), "max_chars": STDLIB_MAX_CHARS, "v": 1}


def iter_stdlib(root: Optional[Path] = None, max_chars: int = STDLIB_MAX_CHARS) -> Iterator[str]:
    """The source code of CPython's pure-Python standard library, one document per .py file, in sorted path
    order (see stdlib_files for which: no site-packages, no test suites), capped at about max_chars = 3 MB in
    all so preprocessing stays fast; files that are not UTF-8 are left out. Python 3.11: ~730 such files,
    ~11 MB, of which every 4th is read (~180 documents, ~3.3 MB)."""
    root = stdlib_dir() if root is None else root
    check_stdlib(root)
    for f in stdlib_files(root, max_chars):
        try:
            text = f.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip() and "\x00" not in text:
            yield text


def iter_text(path: Path, mode: TextMode = "blank", report: Optional[SourceReport] = None) -> Iterator[str]:
    with _TextLines(path, report) as f:
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


def iter_jsonl(path: Path, key: str = "text", report: Optional[SourceReport] = None) -> Iterator[str]:
    with _TextLines(path, report) as f:
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


def iter_documents(path: str, text_mode: TextMode = "blank", json_key: str = "text",
                   report: Optional[SourceReport] = None) -> Iterator[str]:
    """Documents of one input: builtin:pydoc, builtin:stdlib, *.jsonl[.gz|.zst] (by key), or text (by blank line
    or line).

    Binary files are refused (SourceError), and so are truncated or corrupt compressed ones, also when the
    damage is far into the file; `report`, if given, receives the bytes read and invalid UTF-8 bytes replaced.
    """
    if path == BUILTIN_PYDOC:
        yield from iter_pydoc()
        return
    if path == BUILTIN_STDLIB:
        yield from iter_stdlib()
        return
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"input file {path!r} does not exist")
    if _is_jsonl(p):
        yield from iter_jsonl(p, json_key, report)
    else:
        yield from iter_text(p, text_mode, report)
