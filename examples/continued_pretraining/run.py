"""Continued pretraining end to end, on data that ships with Python (no download, CPU).

1. Pretrain a small byte-level model on CPython's English documentation (builtin:pydoc): pretrain.yaml.
2. Continue it on the standard library's Python source (builtin:stdlib) with 0%, 5% and 25% replay of the
   documentation: continue.yaml, re-warmed and re-decayed learning rate, fresh optimizer and data position.
3. Print the final validation losses on the old domain (docs) and the new one (code), and their change from
   the evaluation before the first update of each continued run (val_delta), and write a plot of both
   against the step (PNG, if matplotlib is installed) and the curves as CSV.

    python examples/continued_pretraining/run.py            # from the repository root; ~10 minutes on 2 idle cores
    python examples/continued_pretraining/run.py --report    # only the table/plot of runs already made

Validation is on documents no run trains on: the last 10% of each corpus (data.split "90,10,0" keeps them
out of every training set), written to WORK/valid/{docs,code}.jsonl before the first run.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPLAYS = (0.0, 0.05, 0.25)  # share of the old data (builtin:pydoc) in every global batch
DOMAINS = (("docs", "old domain"), ("code", "new domain"))
SPLIT = "90,10,0"  # as in both configs


def run_name(replay: float) -> str:
    return f"replay{round(replay * 100)}"


def train_override(replay: float) -> str:
    """data.train for a replay share: the new corpus alone at 0%, else both by weight."""
    if replay <= 0:
        return 'data.train=[{name: stdlib, path: "builtin:stdlib"}]'
    return (f'data.train=[{{name: stdlib, path: "builtin:stdlib", weight: {1 - replay:g}}}, '
            f'{{name: pydoc, path: "builtin:pydoc", weight: {replay:g}}}]')


# --------------------------------------------------------------------------- data: the held-out validation files


def write_valid_sets(work: Path) -> dict[str, Path]:
    """WORK/valid/docs.jsonl and code.jsonl: the documents of builtin:pydoc and builtin:stdlib in the validation
    part of data.split, i.e. the ones no training set of the example contains (the engine cuts the split by
    document order; raw builtins are preprocessed keeping every non-empty document)."""
    from engine.data.build import split_ranges
    from engine.data.sources import iter_pydoc, iter_stdlib

    out = work / "valid"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, docs in (("docs", [d for d in iter_pydoc() if d]), ("code", list(iter_stdlib()))):
        lo, hi = split_ranges(len(docs), SPLIT)[1]
        path = out / f"{name}.jsonl"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for d in docs[lo:hi]:
                f.write(json.dumps({"text": d}) + "\n")
        tmp.replace(path)
        print(f"[example] {path}: documents {lo}-{hi} of {len(docs)} ({sum(len(d) for d in docs[lo:hi]):,} chars)",
              flush=True)
        paths[name] = path
    return paths


# --------------------------------------------------------------------------- running


def common_overrides(work: Path) -> list[str]:
    return [f"data.cache_dir={work / 'data_cache'}",
            f"data.valid=[{{name: docs, path: '{work / 'valid' / 'docs.jsonl'}'}}, "
            f"{{name: code, path: '{work / 'valid' / 'code.jsonl'}'}}]"]


def tessera_train(config: Path, overrides: list[str], log: Path) -> None:
    cmd = [sys.executable, "-m", "engine", "train", str(config), *overrides]
    print("[example] " + " ".join(cmd), flush=True)
    t0 = time.time()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(True)[-20:])
        sys.exit(f"[example] failed (exit {proc.returncode}); see {log}:\n{tail}")
    print(f"[example]   done in {time.time() - t0:.0f} s (log {log})", flush=True)


def run_all(work: Path, extra: list[str]) -> None:
    write_valid_sets(work)
    pre = work / "pretrain"
    tessera_train(HERE / "pretrain.yaml", common_overrides(work) + [
        f"train.out_dir={pre}", f"checkpoint.dir={pre / 'checkpoints'}", *extra], work / "logs" / "pretrain.log")
    for replay in REPLAYS:
        out = work / run_name(replay)
        tessera_train(HERE / "continue.yaml", common_overrides(work) + [
            train_override(replay), f"train.out_dir={out}", f"checkpoint.init_from={pre / 'checkpoints'}", *extra],
            work / "logs" / f"{run_name(replay)}.log")


# --------------------------------------------------------------------------- report: table, CSV, plot


def read_curves(metrics: Path) -> dict[str, list[tuple[int, float]]]:
    """{domain: [(step, val_loss)]} from one run's metrics.jsonl (evaluation records only)."""
    curves: dict[str, list[tuple[int, float]]] = {name: [] for name, _ in DOMAINS}
    with open(metrics) as f:
        for line in f:
            rec = json.loads(line)
            for name in curves:
                if f"val_loss/{name}" in rec:
                    curves[name].append((int(rec["step"]), float(rec[f"val_loss/{name}"])))
    return curves


def summarize(curves: dict[str, list[tuple[int, float]]]) -> dict[str, dict[str, float]]:
    """{domain: {start, final, delta}}: the first evaluation (step 0, before any update) and the last."""
    return {name: {"start": pts[0][1], "final": pts[-1][1], "delta": pts[-1][1] - pts[0][1]}
            for name, pts in curves.items() if pts}


def table(runs: dict[str, dict[str, list[tuple[int, float]]]]) -> str:
    """A Markdown table of the final losses per run, their change from step 0, and the comparisons with the
    no-replay run that the example is about."""
    s = {label: summarize(c) for label, c in runs.items()}
    base = s.get(run_name(0.0))
    rows = ["| run | docs (old) at step 0 | docs final | docs change | code (new) at step 0 | code final | "
            "code change | docs rise vs no replay | code final vs no replay |",
            "|---|---|---|---|---|---|---|---|---|"]
    for label, d in s.items():
        docs, code = d.get("docs"), d.get("code")
        if docs is None or code is None:
            rows.append(f"| {label} | (no validation records) |||||||| ")
            continue
        rel_rise = rel_code = "-"
        if base is not None and label != run_name(0.0):
            b_rise = base["docs"]["delta"]
            rel_rise = f"{docs['delta'] / b_rise:.0%}" if b_rise > 0 else "n/a (no rise without replay)"
            rel_code = f"{(code['final'] / base['code']['final'] - 1) * 100:+.2f}%"
        rows.append(f"| {label} | {docs['start']:.4f} | {docs['final']:.4f} | {docs['delta']:+.4f} | "
                    f"{code['start']:.4f} | {code['final']:.4f} | {code['delta']:+.4f} | {rel_rise} | {rel_code} |")
    return "\n".join(rows)


def target(runs: dict[str, dict[str, list[tuple[int, float]]]]) -> list[str]:
    """The issue's target, checked: the new-domain loss falls in every run; with 5% replay the rise of the
    old-domain loss is at most half of the rise without replay, and the new-domain loss within 2% of it."""
    s = {label: summarize(c) for label, c in runs.items()}
    out = []
    falls = all(d["code"]["delta"] < 0 for d in s.values() if "code" in d)
    out.append(f"new-domain loss falls in every run: {'yes' if falls else 'NO'}")
    b, r5 = s.get(run_name(0.0)), s.get(run_name(0.05))
    if b and r5:
        rise0, rise5 = b["docs"]["delta"], r5["docs"]["delta"]
        half = rise5 <= 0.5 * rise0 if rise0 > 0 else None
        verdict = "no rise without replay" if half is None else f"at most half: {'yes' if half else 'NO'}"
        out.append(f"5% replay: old-domain rise {rise5:+.4f} vs {rise0:+.4f} without replay ({verdict})")
        rel = abs(r5["code"]["final"] / b["code"]["final"] - 1)
        out.append(f"5% replay: new-domain loss {r5['code']['final']:.4f} vs {b['code']['final']:.4f} "
                   f"({rel:.2%} apart; within 2%: {'yes' if rel <= 0.02 else 'NO'})")
    return out


def write_csv(runs: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "domain", "step", "val_loss"])
        for label, curves in runs.items():
            for name, pts in curves.items():
                for step, loss in pts:
                    w.writerow([label, name, step, f"{loss:.6f}"])


def plot(runs: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> bool:
    """Old- and new-domain validation loss against the step, one line per run. False (and one message) if
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"[example] matplotlib is not installed: no plot ({path.name}); the curves are in the CSV "
              f"(pip install matplotlib for the PNG)", flush=True)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for ax, (name, title) in zip(axes, DOMAINS):
        for label, curves in runs.items():
            pts = curves.get(name) or []
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label)
        ax.set_title(f"{title}: val_loss/{name}")
        ax.set_xlabel("step of the continued run")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"[example] wrote {path}", flush=True)
    return True


def report(work: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    runs = {}
    for replay in REPLAYS:
        m = work / run_name(replay) / "metrics.jsonl"
        if m.is_file():
            runs[run_name(replay)] = read_curves(m)
    if not runs:
        sys.exit(f"[example] no runs under {work} yet")
    print("\n" + table(runs) + "\n")
    for line in target(runs):
        print("  " + line)
    write_csv(runs, work / "val_curves.csv")
    print(f"[example] wrote {work / 'val_curves.csv'}", flush=True)
    plot(runs, work / "val_curves.png")
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work-dir", default="runs/continued_pretraining", help="where runs, data and plots go")
    p.add_argument("--report", action="store_true", help="only report the runs already in --work-dir")
    p.add_argument("overrides", nargs="*", help="a.b=c overrides for every run (e.g. train.iters=100)")
    args = p.parse_args(argv)
    work = Path(args.work_dir)
    t0 = time.time()
    if not args.report:
        run_all(work, args.overrides)
    report(work)
    print(f"[example] total {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
