"""Writes of PREFIX.bin/.idx/.meta.json: a crash leaves no temporaries (or they are removed by the next write),
and a reader never silently sees a mix of an old and a new write."""

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

import engine.data.indexed as indexed
from engine.data.gpt_dataset import _save_atomic
from engine.data.indexed import IndexedDataset, IndexedDatasetError, IndexedDatasetWriter, tmp_path as tmp_name
from engine.data.preprocess import preprocess
from engine.errors import DataError


def _write(prefix, docs):
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(d)


OLD = [[1, 2, 3, 4], [5, 6]]
NEW = [[9, 8, 7, 6], [5, 4]]  # same lengths: same .idx bytes, same .bin size, other tokens


def _read(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    prefix = tmp_path / "d"
    dead, alive = _dead_pid(), os.getppid()
    stale = [tmp_path / f"d.bin.tmp{dead}", tmp_path / f"d.idx.tmp{dead}-{indexed._HOST}",
             tmp_path / f"d.meta.json.tmp{dead}-{indexed._HOST}"]
    kept = [tmp_path / f"d.bin.tmp{alive}-{indexed._HOST}",   # a live writer
            tmp_path / f"d.bin.tmp{dead}-otherhost",           # another host's writer (shared file system)
            tmp_path / f"dd.bin.tmp{dead}",                    # another prefix
            tmp_path / f"d.bin.tmp{dead}x"]                    # not one of our names
    for p in stale + kept:
        p.write_bytes(b"left over")
    _write(prefix, OLD)
    assert [p for p in stale if p.exists()] == [] and all(p.exists() for p in kept)
    assert _read(prefix) == OLD
    # index caches too
    cache = tmp_path / "c.npy"
    (tmp_path / f"c.npy.tmp{dead}-{indexed._HOST}").write_bytes(b"x")
    _save_atomic(cache, np.arange(3))
    assert sorted(p.name for p in tmp_path.glob("c.npy*")) == ["c.npy"]
    assert indexed._HOST in tmp_name(cache).name and socket.gethostname()


def test_exception_mid_write_keeps_old_dataset_and_no_temporaries(tmp_path):
    prefix = tmp_path / "d"
    _write(prefix, OLD)
    w = IndexedDatasetWriter(prefix, np.uint16)
    w.add_document([1, 2])
    with pytest.raises(RuntimeError):
        with w:
            raise RuntimeError("killed")
    assert _read(prefix) == OLD and not list(tmp_path.glob("*tmp*"))
    # preprocess: a source that fails late (a truncated .gz after a good file)
    import gzip

    (tmp_path / "a.txt").write_text("good\n\ndocs\n")
    body = gzip.compress(("x" * 50 + "\n\n").encode() * 20000)
    (tmp_path / "b.txt.gz").write_bytes(body[:-50])
    with pytest.raises(DataError, match="ends early"):
        preprocess([str(tmp_path / "a.txt"), str(tmp_path / "b.txt.gz")], str(prefix), "byte", progress=False,
                   log=lambda s: None)
    assert _read(prefix) == OLD and not list(tmp_path.glob("*tmp*"))


@pytest.mark.parametrize("crash_at", [0, 1, 2])  # the rename that fails: nothing renamed, one, two
def test_crash_between_renames_is_detected(tmp_path, monkeypatch, crash_at):
    prefix = tmp_path / "d"
    _write(prefix, OLD)
    real, calls = os.replace, []

    def replace(src, dst):
        if len(calls) == crash_at:
            raise OSError("simulated crash")
        calls.append(dst)
        real(src, dst)

    monkeypatch.setattr(indexed.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        _write(prefix, NEW)
    monkeypatch.setattr(indexed.os, "replace", real)
    assert not list(tmp_path.glob("*tmp*"))
    if crash_at == 0:
        assert _read(prefix) == OLD
    else:  # some files are new, some old: never read as data
        with pytest.raises(IndexedDatasetError, match="is being rewritten or was mixed with another write"):
            IndexedDataset(prefix)
    _write(prefix, NEW)  # the next write repairs it
    assert _read(prefix) == NEW


@pytest.mark.parametrize("new_docs", [NEW, [[9, 8, 7], [6, 5, 4]]])  # same .idx, or same .bin size only
@pytest.mark.parametrize("ext", [".bin", ".idx", ".meta.json"])  # the one file taken from the new write
def test_mixed_old_and_new_files_are_detected(tmp_path, new_docs, ext):
    old, new, mixed = tmp_path / "old", tmp_path / "new", tmp_path / "mixed"
    _write(old, OLD)
    _write(new, new_docs)
    for e in (".bin", ".idx", ".meta.json"):
        shutil.copy(f"{new if e == ext else old}{e}", f"{mixed}{e}")
    if open(f"{old}{ext}", "rb").read() == open(f"{new}{ext}", "rb").read():
        assert _read(mixed) == OLD  # the same bytes: nothing is mixed
        return
    with pytest.raises(IndexedDatasetError, match="is being rewritten or was mixed with another write") as e:
        IndexedDataset(mixed)
    assert f"{mixed}.meta.json" in str(e.value)


def test_meta_of_another_write_names_the_sizes(tmp_path):
    old = tmp_path / "old"
    _write(old, OLD)
    # a meta.json from another write of different sizes: caught by the recorded sizes
    _write(tmp_path / "long", OLD + [[1] * 100])
    for e in (".bin", ".idx"):
        shutil.copy(f"{old}{e}", f"{tmp_path / 'x'}{e}")
    shutil.copy(f"{tmp_path / 'long'}.meta.json", f"{tmp_path / 'x'}.meta.json")
    with pytest.raises(IndexedDatasetError, match=r"bin_bytes: expected 212 \(recorded in meta.json\), found 12"):
        IndexedDataset(tmp_path / "x")


def test_damaged_cache_of_a_raw_source_is_rebuilt(tmp_path, capsys):
    from engine.config import config_from_dict
    from engine.data import build_datasets, build_tokenizer

    (tmp_path / "c.txt").write_text("\n\n".join(f"document {i} " * 4 for i in range(30)))
    cfg = config_from_dict({"model": {"max_seq_len": 64, "d_model": 32, "n_layers": 2, "n_heads": 2},
                            "data": {"seq_len": 8, "train": [{"path": str(tmp_path / "c.txt")}], "split": "100,0,0"},
                            "train": {"micro_batch_size": 2, "global_batch_size": 4}})
    tok = build_tokenizer("byte")
    a, _ = build_datasets(cfg, tok, 8, 0, tmp_path / "cache")
    (idx,) = (tmp_path / "cache").glob("raw-c-*.idx")
    idx.write_bytes(idx.read_bytes()[:-8])  # as if killed while writing
    with pytest.raises(IndexedDatasetError):
        build_datasets(cfg, tok, 8, 0, tmp_path / "cache", is_builder=False)  # a reader reports it
    capsys.readouterr()
    b, _ = build_datasets(cfg, tok, 8, 0, tmp_path / "cache")  # the builder rebuilds it
    assert "rebuilding the cache of c" in capsys.readouterr().out
    assert all(a[i]["tokens"].tolist() == b[i]["tokens"].tolist() for i in range(8))
