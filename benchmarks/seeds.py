"""How reliably a training setup finds its boundaries: the same `hmlstm fit` at several seeds, summarized.

    python benchmarks/seeds.py --config synthetic.yaml --seeds 1234 1 2 3 4 5 7 --parallel 2 \
        --dir runs/seeds --out benchmarks/results/seeds.json [-- EXTRA FIT FLAGS]

Each seed trains in DIR/seed-S (`hmlstm fit --config CONFIG --seed_everything S` and the extra flags; one thread
per run when --parallel > 1, so that the runs share the cores rather than fight over them). A seed whose folder
holds a finished run (its `done.txt`) is not trained again: rerunning the command redoes the table, not the
training. Then, per seed, the last validation (`quality.read_run`: BPC, boundary rates, F1 at tolerance 0 and 1),
and how many seeds meet each --target (default: the synthetic language's, layer-1 word F1 >= 0.9 and layer-2 phrase
F1 >= 0.8) with every boundary rate inside --rate-band (default 0.02 to 0.6). JSON out; a Markdown table printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from quality import header, read_run

DEFAULT_TARGETS = ("f1_l1_word=0.9", "f1_l2_phrase=0.8")


def run_dir(root: Path, seed: int) -> Path:
    return root / f"seed-{seed}"


def metrics_dir(folder: Path) -> Path:
    """The newest CSV-logger version folder of a run (the one holding its metrics.csv)."""
    versions = sorted((folder / "lightning_logs" / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        raise FileNotFoundError(f"no lightning_logs/csv/version_* in {folder}: the run did not start")
    return versions[-1]


def train(config: str, seeds: list[int], extra: list[str], root: Path, parallel: int) -> None:
    """Train every seed without a finished run in root, `parallel` at a time. Raises RuntimeError naming the
    seeds whose `hmlstm fit` failed (their log.txt says why)."""
    todo = [s for s in seeds if not (run_dir(root, s) / "done.txt").is_file()]
    env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if parallel > 1 else {}))
    running: dict[int, subprocess.Popen] = {}
    failed = []
    while todo or running:
        while todo and len(running) < parallel:
            seed = todo.pop(0)
            folder = run_dir(root, seed)
            folder.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "hmlstm.cli", "fit", "--config", config, "--seed_everything", str(seed),
                   "--trainer.enable_progress_bar", "false", *extra]
            (folder / "cmd.txt").write_text("hmlstm " + " ".join(cmd[3:]) + "\n")
            print(f"seed {seed}: training in {folder}", flush=True)
            running[seed] = subprocess.Popen(cmd, cwd=folder, env=env, stdout=(folder / "log.txt").open("w"),
                                             stderr=subprocess.STDOUT)
        time.sleep(0.5)
        for seed, proc in list(running.items()):
            if proc.poll() is not None:
                del running[seed]
                if proc.returncode == 0:
                    (run_dir(root, seed) / "done.txt").write_text("0\n")
                else:
                    failed.append(seed)
    if failed:
        raise RuntimeError(f"hmlstm fit failed for seed(s) {failed}: see {root}/seed-S/log.txt")


def summarize(runs: dict[int, dict], targets: dict[str, float], band: tuple[float, float]) -> dict:
    """Per target the seeds meeting it, the seeds with every rate in the band, and the seeds meeting all."""
    def meets(run: dict, key: str) -> bool:
        return run["f1"].get(key, float("nan")) >= targets[key]

    in_band = [s for s, r in runs.items() if r["rates"] and all(band[0] <= v <= band[1] for v in r["rates"].values())]
    per_target = {k: [s for s, r in runs.items() if meets(r, k)] for k in targets}
    every = [s for s in runs if s in in_band and all(s in per_target[k] for k in targets)]
    return {"seeds": len(runs), "meets": per_target, "rates_in_band": in_band, "meets_all": every}


def table(runs: dict[int, dict], targets: dict[str, float]) -> str:
    keys = list(targets)
    lines = ["| seed | steps | val BPC | rates | " + " | ".join(f"{k} (tol 1)" for k in keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    for seed, r in runs.items():
        f1 = [f"{r['f1'].get(k, float('nan')):.3f} ({r['f1'].get(k.replace('f1_', 'f1_tol1_'), float('nan')):.3f})"
              for k in keys]
        rates = ", ".join(f"{v:.3f}" for v in r["rates"].values())
        lines.append(f"| {seed} | {r['steps']} | {r['val_bpc']:.4f} | {rates} | " + " | ".join(f1) + " |")
    return "\n".join(lines)


def parse_targets(items: list[str]) -> dict[str, float]:
    targets = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            targets[key] = float(value)
        except ValueError:
            raise SystemExit(f"--target takes NAME=VALUE (f1_l1_word=0.9), got {item!r}") from None
    return targets


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a config of `hmlstm fit` (synthetic.yaml, a path, ...)")
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--dir", required=True, help="one folder per seed is made below it")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (one thread each when > 1)")
    p.add_argument("--target", action="append", default=None,
                   help=f"NAME=VALUE, an F1 a seed must reach (repeatable; default {' '.join(DEFAULT_TARGETS)})")
    p.add_argument("--rate-band", type=float, nargs=2, default=(0.02, 0.6), metavar=("LOW", "HIGH"))
    p.add_argument("--out", default=None, help="JSON file to write")
    a = p.parse_args(argv)
    if a.parallel < 1:
        p.error(f"--parallel must be >= 1, got {a.parallel}")
    targets = parse_targets(a.target or list(DEFAULT_TARGETS))
    root = Path(a.dir).resolve()
    train(a.config, a.seeds, extra, root, a.parallel)
    runs = {s: read_run(metrics_dir(run_dir(root, s))) for s in a.seeds}
    for r in runs.values():
        r.pop("curve", None)
    result = {"header": header(), "config": a.config, "extra_flags": extra, "targets": targets,
              "rate_band": list(a.rate_band), "summary": summarize(runs, targets, tuple(a.rate_band)),
              "runs": {str(s): r for s, r in runs.items()}}
    print(table(runs, targets))
    s = result["summary"]
    print(f"{len(s['meets_all'])} of {s['seeds']} seeds meet every target with every rate in "
          f"[{a.rate_band[0]}, {a.rate_band[1]}]; " + "; ".join(f"{k} >= {v}: {len(s['meets'][k])}"
                                                              for k, v in targets.items()))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
