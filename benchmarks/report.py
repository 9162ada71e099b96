"""Turn benchmark JSON (from run.py) into Markdown tables and PNG plots.

    python benchmarks/report.py benchmarks/results/cpu-2core.json     # writes .md and .png beside it
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict


def fmt(v, spec: str, none: str = "—") -> str:
    return none if v is None else format(v, spec)


def size_label(r: dict) -> str:
    return f"{r['L']}x{r['H']}, B={r['B']}, T={r['T']}"


def tables(data: dict) -> str:
    h = data["header"]
    lines = [f"Device: **{h.get('device')}**; torch {h.get('torch')}, triton {h.get('triton')}"
             + (f", CUDA {h['cuda']}, cuDNN {h.get('cudnn')}, driver {h.get('driver')}" if h.get("cuda") else "")
             + f"; {h.get('threads')} threads; {h.get('date')}"
             + (f"; hmlstm at commit {h['git']}" if h.get("git") else "") + ".", "",
             f"Command: `{h.get('command')}`", ""]
    by_suite = defaultdict(list)
    for r in data["records"]:
        by_suite[r["suite"]].append(r)
    for suite, recs in by_suite.items():
        lines.append(f"### {suite}")
        lines.append("")
        if any(r["rate"] is not None for r in recs):
            lines += copy_table(recs)
            continue
        lines.append("| size | provider | mode | dtype | median ms | chars/s | peak MB | speedup vs nn.LSTM |")
        lines.append("|---|---|---|---|---:|---:|---:|---:|")
        for r in recs:
            if r["error"]:
                lines.append(f"| {size_label(r)} | {r['provider']} | {r['mode']} | {r['dtype']} | failed: "
                             f"{r['error'][:80]} | | | |")
                continue
            mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20
            lines.append(f"| {size_label(r)} | {r['provider']} | {r['mode']} | {r['dtype']} | "
                         f"{r['median_s'] * 1e3:.1f} | {r['chars_per_s']:,.0f} | {fmt(mem, '.0f')} | "
                         f"{fmt(r['speedup_vs_lstm'], '.2f')} |")
        lines.append("")
    return "\n".join(lines)


def copy_table(recs: list[dict]) -> list[str]:
    """Time at each forced update rate as a fraction of the 100% time, against the ideal work fraction."""
    recs = [r for r in recs if r["rate"] is not None]
    base = {(r["provider"], r["mode"], r["dtype"]): r["median_s"] for r in recs if r["rate"] == 1.0}
    out = ["| provider | mode | dtype | upper-layer rate | layers running | ideal fraction | median ms | "
           "time fraction | speedup vs nn.LSTM |", "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for r in recs:
        if not r["provider"].startswith("hmlstm-"):
            continue
        if r["error"]:
            out.append(f"| {r['provider']} | {r['mode']} | {r['dtype']} | {r['rate']} | failed: {r['error'][:60]} "
                       "| | | | |")
            continue
        b = base.get((r["provider"], r["mode"], r["dtype"]))
        running = ", ".join(f"{f:.2f}" for f in r["work"]["running"]) if r["work"] else "—"
        frac = r["median_s"] / b if b else None
        ideal = r["work"]["ideal_time_fraction"] if r["work"] else None
        out.append(f"| {r['provider']} | {r['mode']} | {r['dtype']} | {r['rate']:.0%} | {running} | "
                   f"{fmt(ideal, '.2f')} | {r['median_s'] * 1e3:.1f} | {fmt(frac, '.2f')} | "
                   f"{fmt(r['speedup_vs_lstm'], '.2f')} |")
    out.append("")
    return out


def _by_provider(records: list[dict], sort_key: str) -> list[tuple[str, list[dict]]]:
    """Records grouped per (provider, mode, dtype) as a legend label, each group sorted by `sort_key`."""
    groups = defaultdict(list)
    for r in records:
        groups[f"{r['provider']} {r['mode']} {r['dtype']}"].append(r)
    return [(label, sorted(rs, key=lambda r: r[sort_key])) for label, rs in sorted(groups.items())]


def _save(fig, ax, path: str, xlabel: str, ylabel: str, title: str, logy: bool = False) -> str:
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plots(data: dict, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    copy = [r for r in data["records"] if r["rate"] is not None and not r["error"] and r["work"]]
    if copy:
        fig, ax = plt.subplots(figsize=(6, 4))
        ideal_drawn = False
        for label, rs in _by_provider(copy, "rate"):
            base = next((r["median_s"] for r in rs if r["rate"] == 1.0), None)
            if not base:
                continue
            ax.plot([r["rate"] for r in rs], [r["median_s"] / base for r in rs], "o-", label=label)
            if not ideal_drawn:
                ax.plot([r["rate"] for r in rs], [r["work"]["ideal_time_fraction"] for r in rs], "k--",
                        label="ideal (work left)")
                ideal_drawn = True
        written.append(_save(fig, ax, f"{stem}-copy.png", "upper-layer boundary rate", "time / time at 100%",
                             "COPY skipping"))
    batch = [r for r in data["records"] if r["suite"] == "batch" and not r["error"]]
    if batch:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, rs in _by_provider(batch, "B"):
            ax.plot([r["B"] for r in rs], [r["chars_per_s"] for r in rs], "o-", label=label)
        written.append(_save(fig, ax, f"{stem}-batch.png", "batch", "characters / s", "Throughput, 3 x 512, T = 100",
                             logy=True))
    return written


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Markdown tables and PNG plots from benchmark JSON")
    p.add_argument("json", nargs="+")
    args = p.parse_args(argv)
    for path in args.json:
        with open(path) as f:
            data = json.load(f)
        stem = os.path.splitext(path)[0]
        with open(f"{stem}.md", "w") as f:
            f.write(tables(data) + "\n")
        print(f"wrote {stem}.md", *plots(data, stem))


if __name__ == "__main__":
    main()
