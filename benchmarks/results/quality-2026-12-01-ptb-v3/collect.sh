#!/usr/bin/env bash
# Copy the two runs' logs from runs/ptb256/ into this folder and rebuild the table, JSON and curves.
# Each run's CSV logs are one folder per launch (version_0: the fifth session; version_1: the sixth session's resume
# from version_0's last checkpoint, and so on); they are joined into one metrics.csv, each launch's rows kept up to
# the step the next launch resumed from. train/wall_s counts every second since the run's start, so the JSON and
# curves are made from copies that leave out the times both runs were paused (SIGSTOP, while CI or a benchmark ran
# alone on the cores): 941 s in the fifth session (after HM step 1399 / LSTM step 1549), and in later launches the
# intervals in runs/ptb256/pauses.txt (unix time of each stop and cont), placed on a launch's wall clock by the time
# its CSV logger wrote hparams.yaml (the fit's start, to within seconds) and the wall clock of the checkpoint it
# resumed from.
set -euo pipefail
cd "$(dirname "$0")/../../.."  # the repository root
out=benchmarks/results/quality-2026-12-01-ptb-v3
tmp=$(mktemp -d)
for r in hm lstm; do
  mkdir -p $out/$r
  for v in runs/ptb256/$r/lightning_logs/csv/version_*; do
    n=$(basename $v)
    mkdir -p $out/$r/$n
    cp $v/metrics.csv $v/config.yaml $out/$r/$n/
    stat -c %Y $v/hparams.yaml > $out/$r/$n/started_unix.txt
    if [ -n "${prev:-}" ]; then  # the wall clock this launch resumed from: the previous launch's last checkpoint
      python -c "import sys, torch; print(torch.load(sys.argv[1], map_location='cpu', weights_only=False)['hmlstm']['wall_s'])" \
        $prev/checkpoints/last.ckpt > $out/$r/$n/resumed_wall_s.txt
    fi
    prev=$v
  done
  prev=""
  cp runs/ptb256/$r/cmd*.txt $out/$r/
  rm -f $out/$r/metrics.csv $out/$r/config.yaml  # the fifth session's single-launch copies, now in version_0/
done
cp runs/ptb256/ptb-ckpt100.yaml $out/ 2>/dev/null || true
[ -f runs/ptb256/pauses.txt ] && cp runs/ptb256/pauses.txt $out/
python - "$out" "$tmp" <<'PY'
import csv, sys
from pathlib import Path
out, tmp = Path(sys.argv[1]), Path(sys.argv[2])
pauses = []  # (stop, cont) unix seconds
if (out / "pauses.txt").exists():
    stop = None
    for line in (out / "pauses.txt").read_text().split("\n"):
        if line.strip():
            t, what = line.split()
            if what == "stop":
                stop = int(t)
            elif stop is not None:
                pauses.append((stop, int(t)))
                stop = None
for run, last_before in (("hm", 1399), ("lstm", 1549)):
    versions = sorted((out / run).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    launches = [list(csv.DictReader((v / "metrics.csv").open())) for v in versions]
    fields = list(dict.fromkeys(k for rows in launches for k in rows[0]))
    joined = []
    for i, (v, rows) in enumerate(zip(versions, launches)):
        upto = min(int(r["step"]) for r in launches[i + 1]) if i + 1 < len(launches) else None
        started = int((v / "started_unix.txt").read_text())
        resumed = float((v / "resumed_wall_s.txt").read_text()) if i > 0 else 0.0
        for r in rows:
            if upto is not None and int(r["step"]) >= upto:
                continue
            if r.get("train/wall_s"):
                w = float(r["train/wall_s"])
                if i > 0 or int(r["step"]) > last_before:
                    w -= 941.0  # the fifth session's pause, inside every later wall (checkpoints carry it)
                # a later launch's pauses: those that began after it started and before this row (the row's unix
                # time is the start plus the wall clock it added to the checkpoint's)
                row_unix = started + (float(r["train/wall_s"]) - resumed)
                w -= sum(c - s for s, c in pauses if i > 0 and started <= s < row_unix)
                r["train/wall_s"] = str(w)
            joined.append(r)
    (tmp / run).mkdir()
    with (tmp / run / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(joined)
PY
python benchmarks/quality.py HM-LSTM=$tmp/hm LN-LSTM=$tmp/lstm --out $out/quality.json --plot $out/curves.png
cp $tmp/hm/metrics.csv $out/hm/metrics-joined-pauses-removed.csv
cp $tmp/lstm/metrics.csv $out/lstm/metrics-joined-pauses-removed.csv
