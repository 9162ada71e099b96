"""Each fused backend on a device against the reference, before any timing: every output and gradient of a few
small models (fp32, and bf16 against the 2x rule of the tests); JSON out. The first thing a GPU session checks.

    python benchmarks/gpu_smoke.py --device cuda --out smoke.json

Exit status 1 if a backend differs from the reference (the JSON says where), 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from harness import bf16_errors_beyond_2x, make_case, reference_errors  # noqa: E402

import hmlstm  # noqa: E402

CASES = [dict(boundary="step", copy_boundary="hold", layer_norm=False),
         dict(boundary="sample", copy_boundary="recompute", layer_norm=True),
         dict(boundary="soft", copy_boundary="recompute", layer_norm=False)]


def _write(args, backends, recs, rec) -> None:
    print(json.dumps(rec), flush=True)
    with open(args.out, "w") as f:  # after every case: a crash keeps what was checked
        json.dump({"device": args.device, "backends": backends, "records": recs}, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="5,7,64x33x20", help="B,T,HxHxH of the cases")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    B, T, hs = args.sizes.split(",")
    B, T, hs = int(B), int(T), tuple(int(h) for h in hs.split("x"))
    backends = [b for b in hmlstm.available_backends(args.device) if b != "reference"]
    recs, failed = [], False
    for backend in backends:
        for k, opts in enumerate(CASES):
            case = make_case(B, T, hs, dtype=torch.float32, seed=k, device=args.device, **opts)
            t0 = time.perf_counter()
            errs = reference_errors(backend, case)
            rec = {"backend": backend, "dtype": "float32", **opts, "max_rel_err": max(errs.values()),
                   "worst": max(errs, key=errs.get), "ok": max(errs.values()) < 1e-4,
                   "seconds": round(time.perf_counter() - t0, 2)}
            failed |= not rec["ok"]
            recs.append(rec)
            _write(args, backends, recs, rec)
        # bf16: each error within 2x that of the same computation in bf16 PyTorch (+1e-3), as the tests say, on
        # forced boundaries (random ones may flip between precisions, in PyTorch and the backend alike)
        case = make_case(B, T, hs, pattern="alternating", layer_norm=True, dtype=torch.float32, device=args.device)
        over = bf16_errors_beyond_2x(backend, case)
        rec = {"backend": backend, "dtype": "bfloat16", "pattern": "alternating", "layer_norm": True,
               "ok": not over, "over_2x": over}
        failed |= not rec["ok"]
        recs.append(rec)
        _write(args, backends, recs, rec)
    if not backends:
        print(f"no fused backend is available on {args.device}: {hmlstm.available_backends(args.device)}")
        failed = True
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
