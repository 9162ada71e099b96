"""Compile every Triton kernel configuration that hmlstm launches at the PTB and text8 sizes, ahead of time for
sm_90 (H100/H200), and check shared memory, registers and spills; needs no GPU. JSON out.

    python benchmarks/aot_sm90.py --out benchmarks/results/aot-sm90.json

How: the Triton ops' launchers run on `meta`-device tensors (shapes only, nothing computed) with their launch
function replaced by a recorder, so the configurations are exactly the ones a GPU run would launch; each
distinct (kernel, argument types, constexprs, num_warps, num_stages) is compiled with `triton.compile` for
`GPUTarget("cuda", 90, 32)`, and ptxas reports registers and spills. Must run without TRITON_INTERPRET=1
(the interpreter's kernels cannot be compiled): tests/test_triton_aot.py runs it in a subprocess.

Limits checked (an H100's, the smaller of the two): 227 KB of shared memory per block, no spill stores or
loads, at most 255 registers per thread.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any

SMEM_LIMIT = 227 * 1024
SIZES = {"ptb": dict(B=64, I=128, H=512, L=3), "text8": dict(B=128, I=128, H=1024, L=3)}
DTYPES = ("float32", "bfloat16", "float64")


def _record(dtype_name: str, size: dict) -> list[tuple]:
    """The launches of one training step (forward with a gradient, backward) and one inference forward, with
    and without layer norm."""
    import torch

    from hmlstm.ops.triton import seq_op

    dtype = getattr(torch, dtype_name)
    calls: list[tuple] = []

    def recorder(kernel, grid, *args, **meta):
        calls.append((kernel, args, meta))

    seq_op._launch = recorder
    B, I, H, L = size["B"], size["I"], size["H"], size["L"]
    T = 2  # the configurations do not depend on T
    dev = "meta"
    c_dtype = torch.float32 if dtype in seq_op.HALF else dtype
    sizes = [I] + [H] * L
    for ln in (False, True):
        lay = seq_op.layout(tuple(sizes), T, B, ln, True)
        x = torch.empty(B, T, I, device=dev, dtype=dtype)
        h0 = [torch.empty(B, H, device=dev, dtype=dtype) for _ in range(L)]
        c0 = [torch.empty(B, H, device=dev, dtype=c_dtype) for _ in range(L)]
        z0 = [torch.empty(B, device=dev, dtype=dtype) for _ in range(L - 1)]
        wall = torch.empty(lay.wall_numel, device=dev, dtype=dtype)
        slope = torch.empty((), device=dev, dtype=dtype)
        for recompute, mode in ((True, 0), (False, 1)):  # "recompute" with "step", "hold" with "sample"
            noise = torch.empty(B, T, L - 1, device=dev, dtype=dtype) if mode == 1 else None
            for need_grad in (False, True):
                HS, CS, ZS, PRE = seq_op.triton_seq_fwd._init_fn(x, h0, c0, z0, wall, slope, noise, None, sizes,
                                                                 mode, recompute, ln, need_grad)
            grads = (torch.empty_like(HS), torch.empty_like(CS), torch.empty_like(ZS))
            seq_op.triton_seq_bwd._init_fn(x, wall, slope, noise, HS, CS, ZS, PRE, *grads, sizes, mode, recompute,
                                           ln)
    return calls


_PTR = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "float64": "*fp64", "int64": "*i64",
        "int32": "*i32", "bool": "*i1"}


def _signature(kernel, args: tuple, meta: dict) -> tuple[dict, dict]:
    import torch

    names = kernel.arg_names
    sig, const = {}, {}
    values = dict(zip(names, args)) | meta
    for p in kernel.params:
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            const[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = _PTR[str(v.dtype).split(".")[-1]]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{kernel.fn.__name__}: cannot type argument {p.name}={v!r}")
    return sig, const


def _ptxas_path() -> str:
    try:  # the ptxas that triton.compile itself uses for sm_90
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except (ImportError, AttributeError, TypeError):
        path = shutil.which("ptxas")
        if path is None:
            raise RuntimeError("no ptxas: install triton (it bundles one) or the CUDA toolkit")
        return path


def _ptxas_report(ptx: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas_path(), "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log[-2000:]}")
    regs = [int(m) for m in re.findall(r"Used (\d+) registers", log)]
    spill_st = [int(m) for m in re.findall(r"(\d+) bytes spill stores", log)]
    spill_ld = [int(m) for m in re.findall(r"(\d+) bytes spill loads", log)]
    return {"registers": max(regs, default=0), "spill_stores": sum(spill_st), "spill_loads": sum(spill_ld)}


def _causes(e: BaseException) -> str:
    """The exceptions behind e (a CompilationError shows where in the kernel, its cause says what failed)."""
    out, seen = "", {id(e)}
    c = e.__cause__ or e.__context__
    while c is not None and id(c) not in seen:
        seen.add(id(c))
        out += f"; caused by {type(c).__name__}: {str(c)[-300:]}"
        c = c.__cause__ or c.__context__
    return out


def compile_all(names: list[str], dtypes: list[str]) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    seen, out = set(), []
    for name in names:
        for dt in dtypes:
            for kernel, args, meta in _record(dt, SIZES[name]):
                meta = dict(meta)
                opts = {"num_warps": meta.pop("num_warps", 4), "num_stages": meta.pop("num_stages", 3)}
                sig, const = _signature(kernel, args, meta)
                key = (kernel.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(const.items())),
                       tuple(sorted(opts.items())))
                if key in seen:
                    continue
                seen.add(key)
                rec: dict[str, Any] = {"kernel": kernel.fn.__name__, "size": name, "dtype": dt, **opts,
                                       "constexprs": {k: v for k, v in const.items()}}
                try:
                    ck = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const), target=target,
                                        options=opts)
                    rec["shared_bytes"] = int(ck.metadata.shared)
                    rec |= _ptxas_report(ck.asm["ptx"])
                except Exception as e:  # recorded, and the check below fails on it
                    rec["error"] = f"{type(e).__name__}: {str(e)[-1500:]}" + _causes(e)
                rec["ok"] = ("error" not in rec and rec["shared_bytes"] <= SMEM_LIMIT and rec["spill_stores"] == 0
                             and rec["spill_loads"] == 0 and rec["registers"] <= 255)
                out.append(rec)
                print(f"{rec['kernel']:24s} {name:6s} {dt:9s} smem {rec.get('shared_bytes', '-'):>7} "
                      f"regs {rec.get('registers', '-'):>4} spills {rec.get('spill_stores', '-')}/"
                      f"{rec.get('spill_loads', '-')} {'ok' if rec['ok'] else 'FAIL ' + rec.get('error', '')[:200]}",
                      flush=True)
    return out


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--out", default=None, help="JSON file for the records")
    args = p.parse_args()
    recs = compile_all(args.sizes, args.dtypes)
    if args.out:
        with open(args.out, "w") as f:
            import triton
            json.dump({"target": "sm_90", "smem_limit": SMEM_LIMIT, "triton": triton.__version__, "records": recs},
                      f, indent=1, default=str)
    bad = [r for r in recs if not r["ok"]]
    print(f"{len(recs)} configurations, {len(bad)} over the limits or failing")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
