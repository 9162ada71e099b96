"""Model-quality table of training runs: what `hmlstm fit` logged, summarized per run.

    python benchmarks/quality.py NAME=lightning_logs/csv/version_0 NAME2=... --out results/quality.json \
        [--plot curves.png] [--compare [steps]]

Each run is a folder holding the metrics.csv of a CSVLogger, or such a CSV file itself. For every run: steps,
training wall time, validation BPC (last and best; test BPC when `hmlstm test` logged one into the same file), each layer's
boundary rate and, where the data has true boundaries, the F1 of each layer against each level at
tolerance 0 and 1 (`hmlstm.metrics`), all from the last validation. Writes JSON (with a header naming the
machine and versions) and prints a Markdown table; `--plot` draws validation BPC against steps and wall time.
`--compare` adds two tables (and JSON entries): every run at the validation steps they all reached, and every
run's best validation BPC so far at the wall time of each validation of the first run. Wall times compare only
between runs that shared the machine the same way (side by side from the same start, or each alone): for runs
that did not, `--compare steps` leaves the wall-time table out.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import re
from datetime import date
from pathlib import Path


def _float(v: str) -> float:
    return float(v) if v not in ("", None) else math.nan


def read_run(folder: str | Path) -> dict:
    """The summary of one run: a folder holding its metrics.csv, or the CSV file itself."""
    path = Path(folder) if str(folder).endswith(".csv") else Path(folder) / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent}")
    rows = list(csv.DictReader(path.open()))
    wall = [(int(r["step"]), _float(r["train/wall_s"])) for r in rows if r.get("train/wall_s")]
    vals = [r for r in rows if r.get("val/bpc")]
    if not vals:
        raise ValueError(f"{path} has no validation (val/bpc)")

    def wall_at(step: int) -> float:
        before = [w for s, w in wall if s <= step]
        return before[-1] if before else math.nan

    def point(r: dict) -> dict:
        return {"step": int(r["step"]), "wall_s": wall_at(int(r["step"])), "val_bpc": _float(r["val/bpc"]),
                "rates": _rates(r), "f1": _f1(r)}

    last = vals[-1]
    out = {
        "steps": int(last["step"]),
        "wall_s": wall_at(int(last["step"])),
        "val_bpc": _float(last["val/bpc"]),
        "best_val_bpc": min(_float(r["val/bpc"]) for r in vals),
        "curve": [point(r) for r in vals],
    }
    tests = [r for r in rows if r.get("test/bpc")]
    if tests:
        out["test_bpc"] = _float(tests[-1]["test/bpc"])
    out["rates"] = _rates(last)
    out["f1"] = _f1(last)
    out.update(stability(rows))
    return out


def _rates(row: dict) -> dict:
    """{layer: boundary rate} of one validation row."""
    return {k.split("_l")[-1]: _float(v) for k, v in row.items() if k.startswith("val/boundary_rate_l") and v}


def _f1(row: dict) -> dict:
    """{"f1_l1_word": F1, "f1_tol1_l1_word": F1, ...} of one validation row."""
    return {k[len("val/"):]: _float(v) for k, v in row.items() if re.match(r"val/f1_(tol\d+_)?l\d+_", k) and v}


def at_equal_steps(runs: dict[str, dict]) -> list[dict]:
    """Every run at each validation step all of them reached: [{"step": s, NAME: curve point, ...}]."""
    by_step = {name: {p["step"]: p for p in r["curve"]} for name, r in runs.items()}
    common = sorted(set.intersection(*(set(s) for s in by_step.values())))
    return [{"step": s, **{name: pts[s] for name, pts in by_step.items()}} for s in common]


def at_equal_wall(runs: dict[str, dict]) -> list[dict]:
    """At the wall time of each validation of the first run: each other run's best validation BPC among those it
    logged by then, and at which step. [{"step", "wall_s", FIRST: bpc, NAME: {"best_val_bpc", "step"} or None}]"""
    (first, base), *others = runs.items()
    out = []
    for p in base["curve"]:
        if math.isnan(p["wall_s"]):
            continue
        row = {"step": p["step"], "wall_s": p["wall_s"], first: p["val_bpc"]}
        for name, r in others:
            seen = [q for q in r["curve"] if q["wall_s"] <= p["wall_s"]]
            best = min(seen, key=lambda q: q["val_bpc"]) if seen else None
            row[name] = {"best_val_bpc": best["val_bpc"], "step": best["step"]} if best else None
        out.append(row)
    return out


def _largest_rise(points: list[tuple[int, float]], span: int = 100) -> float:
    """The largest b2 - b1 over logged (step, b) pairs at most span steps apart (0 with fewer than two)."""
    rises = [b2 - b1 for s1, b1 in points for s2, b2 in points if 0 < s2 - s1 <= span]
    return max(rises) if rises else 0.0


def stability(rows: list[dict]) -> dict:
    """The PTB criteria of a stable run, over the logged steps after the first epoch: the largest rise within 100
    steps of the training BPC, of single batches (`bpc_rise_100_steps`) and, where the run logged it, of its mean
    over the last 100 steps (`bpc_100_rise_100_steps`: the training BPC over 100 steps, which a single batch's
    difficulty does not move), and the largest gradient norm (before clipping) over the running median of the
    norms logged before it. All read what the run logged (every `log_every_n_steps`)."""
    out = {}
    steps = [(int(r["step"]), int(r["epoch"]), _float(r["train/bpc_step"]), _float(r.get("train/grad_norm", "")))
             for r in rows if r.get("train/bpc_step")]
    grads = [g for _, _, _, g in steps if not math.isnan(g)]
    if grads:
        out["grad_norm_max"] = max(grads)
    later = [(s, b) for s, e, b, _ in steps if e >= 1]
    if later:
        out["bpc_rise_100_steps"] = _largest_rise(later)
    window = [(int(r["step"]), _float(r["train/bpc_100"])) for r in rows
              if r.get("train/bpc_100") and int(r["epoch"]) >= 1]
    if window:
        out["bpc_100_rise_100_steps"] = _largest_rise(window)
    ratios, seen = [], []
    for _, _, _, g in steps:
        if math.isnan(g):
            continue
        if len(seen) >= 5:
            med = sorted(seen)[len(seen) // 2]
            ratios.append(g / med)
        seen.append(g)
    if ratios:
        out["grad_norm_over_running_median"] = max(ratios)
    return out


def header() -> dict:
    import torch

    return {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def table(runs: dict[str, dict]) -> str:
    levels = sorted({k for r in runs.values() for k in r["f1"] if not k.startswith("f1_tol")})
    cols = ["run", "steps", "wall", "val BPC", "rates"] + [f"{k} (tol 1)" for k in levels]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, r in runs.items():
        rates = ", ".join(f"{v:.3f}" for _, v in sorted(r["rates"].items())) or "-"
        f1 = [f"{r['f1'][k]:.3f} ({r['f1'].get(k.replace('f1_', 'f1_tol1_'), math.nan):.3f})" if k in r["f1"]
              else "-" for k in levels]
        wall = "-" if math.isnan(r["wall_s"]) else f"{r['wall_s']:.0f} s"
        lines.append(f"| {name} | {r['steps']} | {wall} | {r['val_bpc']:.4f} | {rates} | " + " | ".join(f1) + " |")
    return "\n".join(lines)


def stability_table(runs: dict[str, dict]) -> str:
    """Markdown: each run's `stability` figures after its first epoch ("-" where it did not log them)."""
    def cell(r: dict, key: str, fmt: str, unit: str = "") -> str:
        return format(r[key], fmt) + unit if key in r else "-"

    lines = ["| run | training BPC rise in 100 steps: single batch | the same, 100-step mean | largest grad norm / "
             "running median |", "|---|---:|---:|---:|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {cell(r, 'bpc_rise_100_steps', '.3f')} | {cell(r, 'bpc_100_rise_100_steps', '.3f')}"
                     f" | {cell(r, 'grad_norm_over_running_median', '.2f', 'x')} |")
    return "\n".join(lines)


def compare_tables(names: list[str], steps: list[dict], wall: list[dict] | None) -> str:
    """Markdown: validation BPC (layer-1 F1 against words where logged) at equal steps (`at_equal_steps`), then,
    where given, at equal wall time (`at_equal_wall`)."""
    lines = ["At equal steps (validation BPC; layer-1 F1 against words, tolerance 0, where logged):", "",
             "| step | " + " | ".join(names) + " |", "|---:|" + "---|" * len(names)]
    for row in steps:
        cells = []
        for n in names:
            p = row[n]
            f1 = p["f1"].get("f1_l1_word")
            cells.append(f"{p['val_bpc']:.4f}" + (f", {f1:.3f}" if f1 is not None else ""))
        lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    if wall is None:
        return "\n".join(lines)
    lines += ["", f"At the wall time of each validation of {names[0]} (the others' best validation BPC by then, "
              "and its step):", "", "| step | wall | " + " | ".join(names) + " |", "|---:|---:|" + "---|" * len(names)]
    for row in wall:
        cells = [f"{row[names[0]]:.4f}"] + [
            "-" if row[n] is None else f"{row[n]['best_val_bpc']:.4f} (step {row[n]['step']})" for n in names[1:]]
        lines.append(f"| {row['step']} | {row['wall_s']:.0f} s | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in runs.items():
        steps = [p["step"] for p in r["curve"]]
        bpc = [p["val_bpc"] for p in r["curve"]]
        axes[0].plot(steps, bpc, marker=".", label=name)
        axes[1].plot([p["wall_s"] / 60 for p in r["curve"]], bpc, marker=".", label=name)
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training wall time (min)")
    for ax in axes:
        ax.set_ylabel("validation BPC")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="NAME=FOLDER (a folder with metrics.csv) or NAME=FILE.csv")
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--plot", help="PNG of validation BPC against steps and wall time")
    p.add_argument("--compare", nargs="?", const="both", choices=["both", "steps"],
                   help="also tabulate the runs at equal steps and (unless 'steps') at the first run's wall times")
    a = p.parse_args(argv)
    runs = {}
    for spec in a.runs:
        name, _, folder = spec.partition("=")
        if not folder:
            p.error(f"runs must be NAME=FOLDER, got {spec!r}")
        runs[name] = read_run(folder)
    print(table(runs))
    print()
    print(stability_table(runs))
    doc = {"header": header(), "runs": runs}
    if a.compare:
        print()
        steps = at_equal_steps(runs)
        wall = at_equal_wall(runs) if a.compare == "both" else None
        print(compare_tables(list(runs), steps, wall))
        doc["equal_steps"] = [{"step": row["step"], **{n: row[n]["val_bpc"] for n in runs}} for row in steps]
        if wall is not None:
            doc["equal_wall"] = wall
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(doc, indent=1))
    if a.plot:
        plot(runs, a.plot)


if __name__ == "__main__":
    main()
