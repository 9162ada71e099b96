"""Speed of HM-LSTM backends against torch's LSTM (cuDNN on a GPU, oneDNN on the CPU); JSON out.

    python benchmarks/run.py --suites ptb copy --out benchmarks/results/cpu.json           # CPU
    python benchmarks/run.py --device cuda --dtypes float32 bfloat16 --out gpu.json       # GPU, all suites
    python benchmarks/report.py benchmarks/results/cpu.json                              # tables + plots
    python benchmarks/run.py --suites trained --trained-ckpt last.ckpt --ptb-dir data/ptb --out trained.json

One record per (suite, size, provider, mode, dtype): median seconds, characters per second (B * T / median),
peak memory (GPU only) and the speedup against `nn.LSTM` measured in the same run on the same input. A
provider that fails records its error and the sweep goes on. The header names the device and versions.

Providers: `hmlstm-<backend>` for each HM-LSTM backend, `lstm` (nn.LSTM with the same layers and sizes) and,
on a GPU, `lstm-fp16-layers` (three single-layer fp16 nn.LSTMs, where cuDNN may use persistent kernels) and
`<provider>-graph` (the same step captured once as a CUDA graph and replayed: no Python or launch overhead;
`hmlstm-triton-graph` and `lstm-graph` by default).
Modes: `fw` (inference, no autograd) and `fwbw` (training step: forward, and backward of a random projection
of the top layer's output). Inputs are (B, T, 128), the paper's character embedding size (--input-size).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from patterns import force_boundaries, work_fractions  # noqa: E402

import hmlstm  # noqa: E402
from hmlstm import HMLSTM  # noqa: E402

INPUT = 128


@dataclass(frozen=True)
class Size:
    B: int
    T: int
    H: int
    L: int = 3
    rate: Optional[float] = None  # forced upper-layer update rate (copy suite), None: natural weights
    ckpt: Optional[str] = None  # trained suite: a PTB language model's checkpoint, run on PTB validation text


def suites(device: str, ckpt: Optional[str] = None) -> dict[str, list[Size]]:
    """The paper's PTB and text8 sizes, the batch, hidden-size and length sweeps, the COPY-skipping sweep and, given a
    checkpoint, the trained model's own boundaries (its layer sizes; batch 64, 100 steps)."""
    trained = [] if ckpt is None else [Size(64, 100, trained_lm(ckpt).net.rnn.hidden_sizes[0],
                                            len(trained_lm(ckpt).net.rnn.hidden_sizes), ckpt=ckpt)]
    return {
        "trained": trained,
        "ptb": [Size(64, 100, 512)],
        "text8": [Size(128, 100, 1024)],
        "batch": [Size(b, 100, 512) for b in (1, 16, 64, 256)],
        "hidden": [Size(64, 100, h) for h in (256, 512, 1024)],
        "steps": [Size(64, t, 512) for t in (100, 1000)],
        "copy": [Size(64, 100, 512, rate=r) for r in (1.0, 0.5, 0.2, 0.05)],
        # tiny sizes: checks that the harness runs end to end (tests), not a measurement
        "smoke": [Size(2, 3, 16), Size(2, 3, 16, rate=1.0), Size(2, 3, 16, rate=0.5)],
    }


@dataclass
class Record:
    suite: str
    provider: str
    mode: str
    dtype: str
    B: int
    T: int
    H: int
    L: int
    rate: Optional[float] = None
    median_s: Optional[float] = None
    iqr_s: Optional[float] = None
    runs: int = 0
    chars_per_s: Optional[float] = None
    peak_mem_bytes: Optional[int] = None
    speedup_vs_lstm: Optional[float] = None
    work: Optional[dict] = None
    error: Optional[str] = None
    extra: dict = field(default_factory=dict)


def header(device: torch.device) -> dict:
    h = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "hmlstm": hmlstm.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "backends": hmlstm.available_backends(device),
        # CPU timings are only comparable on a quiet machine: the 1/5/15-minute load when the run started
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git": git_commit(),
    }
    try:
        import triton

        h["triton"] = triton.__version__
    except ImportError:
        h["triton"] = None
    if device.type == "cuda":
        h["device"] = torch.cuda.get_device_name(device)
        h["cuda"] = torch.version.cuda
        h["cudnn"] = torch.backends.cudnn.version()
        try:
            h["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            h["driver"] = f"unknown ({e})"
    else:
        h["device"] = cpu_name()
        h["onednn"] = torch.backends.mkldnn.is_available()
    return h


def git_commit() -> Optional[str]:
    """The checkout's commit, with "+changes" when tracked files other than benchmarks/results (earlier runs'
    output) differ from it; None outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=20)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root,
                               capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty else "")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


# -- the trained suite: a checkpoint's HM-LSTM on real text ---------------------------------------------

_LOADED: dict = {}
PTB_DIR = {"path": None}  # set by --ptb-dir


def trained_lm(ckpt: str):
    """The HMLSTMLanguageModel of a `hmlstm fit` checkpoint (cached; CPU)."""
    if ckpt not in _LOADED:
        from hmlstm.training import HMLSTMLanguageModel

        _LOADED[ckpt] = HMLSTMLanguageModel.load_from_checkpoint(ckpt, map_location="cpu").eval()
    return _LOADED[ckpt]


@torch.no_grad()
def trained_input(size: Size) -> torch.Tensor:
    """(B, T, E) the trained embedding of PTB validation text: B streams that start evenly spaced through
    the text (as the training loader's), each at an offset of 10 * T characters so that no row starts at
    the stream's beginning. The same tensor for every provider."""
    from hmlstm.data import PTBDataModule

    if PTB_DIR["path"] is None:
        raise ValueError("the trained suite needs --ptb-dir (the folder of ptb.char.valid.txt)")
    lm = trained_lm(size.ckpt)
    text = PTBDataModule(data_dir=PTB_DIR["path"], download=False).load_splits()["val"]
    ids = lm.vocab.encode(text)
    stride = ids.numel() // size.B
    if stride < 11 * size.T:
        raise ValueError(f"the validation text ({ids.numel()} characters) is too short for B={size.B}, T={size.T}")
    rows = torch.stack([ids[k * stride + 10 * size.T: k * stride + 11 * size.T] for k in range(size.B)])
    return lm.net.embed(rows).float()


# -- providers: build (model, input) and a step function ---------------------------------------------


def build(provider: str, size: Size, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Returns (forward_fn, params) where forward_fn(x) -> top-layer output (B, T, H)."""
    torch.manual_seed(seed)
    if size.ckpt is not None:
        x = trained_input(size).to(device=device, dtype=dtype)
        if provider.startswith("hmlstm-"):
            rnn = trained_lm(size.ckpt).net.rnn
            model = HMLSTM(rnn.input_size, rnn.hidden_sizes, boundary=rnn.boundary, copy_boundary=rnn.copy_boundary,
                           layer_norm=rnn.layer_norm, backend=provider.split("-", 1)[1])
            model.load_state_dict(rnn.state_dict())
            model = model.to(device=device, dtype=dtype)
            slope = torch.ones((), device=device, dtype=dtype)  # on the device: a graph replays no host copy
            return (lambda inp: model(inp, slope=slope).h[-1]), model, x
    elif provider.startswith("hmlstm-"):
        model = HMLSTM(INPUT, (size.H,) * size.L, backend=provider.split("-", 1)[1])
        x = torch.randn(size.B, size.T, INPUT)
        if size.rate is not None:
            x = force_boundaries(model, x, size.rate, seed)
        model = model.to(device=device, dtype=dtype)
        slope = torch.ones((), device=device, dtype=dtype)
        return (lambda inp: model(inp, slope=slope).h[-1]), model, x.to(device=device, dtype=dtype)
    if size.ckpt is None:
        x = torch.randn(size.B, size.T, INPUT, device=device, dtype=dtype)
    if provider == "lstm":
        lstm = nn.LSTM(x.shape[-1], size.H, num_layers=size.L, batch_first=True).to(device=device, dtype=dtype)
        return (lambda inp: lstm(inp)[0]), lstm, x
    if provider == "lstm-fp16-layers":
        layers = nn.ModuleList(nn.LSTM(x.shape[-1] if k == 0 else size.H, size.H, batch_first=True)
                               for k in range(size.L)).to(device=device, dtype=torch.float16)

        def fw(inp):
            for layer in layers:
                inp = layer(inp)[0]
            return inp

        return fw, layers, x.to(torch.float16)
    raise ValueError(f"unknown provider {provider!r}")


def make_step(mode: str, fw: Callable, module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    if mode == "fw":
        def step():
            with torch.no_grad():
                fw(x)
        return step
    gen = torch.Generator(device=x.device).manual_seed(1)
    upstream = {}

    def step():
        module.zero_grad(set_to_none=True)
        y = fw(x)
        if "g" not in upstream:
            upstream["g"] = torch.randn(y.shape, device=y.device, dtype=y.dtype, generator=gen)
        (y * upstream["g"]).sum().backward()
    return step


def graph_step(step: Callable[[], None]) -> Callable[[], None]:
    """`step` captured once as a CUDA graph (after warm-up calls on a side stream, which allocate its buffers and
    fill the launchers' caches); returns the replay. Static shapes and addresses: the same input every call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def time_cpu(step: Callable, min_time: float) -> tuple[float, float, int]:
    from torch.utils import benchmark

    step()  # warm-up: first-call allocations and lazy initialization stay out of the numbers
    m = benchmark.Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads()) \
        .blocked_autorange(min_run_time=min_time)
    return m.median, m.iqr, len(m.times)


def time_cuda(step: Callable, min_time: float) -> tuple[float, float, int]:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    times, t_end = [], time.perf_counter() + min_time
    while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 200):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    q = statistics.quantiles(times, n=4)
    return statistics.median(times), q[2] - q[0], len(times)


def measure(suite: str, provider: str, mode: str, size: Size, dtype: torch.dtype, device: torch.device,
            min_time: float) -> Record:
    rec = Record(suite, provider, mode, str(dtype).split(".")[-1], size.B, size.T, size.H, size.L, size.rate)
    graph = provider.endswith("-graph")
    try:
        if graph and device.type != "cuda":
            raise RuntimeError("a -graph provider replays a CUDA graph: it needs --device cuda")
        fw, module, x = build(provider.removesuffix("-graph"), size, dtype, device)
        if (size.rate is not None or size.ckpt is not None) and provider.startswith("hmlstm-"):
            with torch.no_grad():
                out = module(x)
            rec.work = work_fractions(module, out)
        step = make_step(mode, fw, module, x)
        if graph:
            step = graph_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            rec.median_s, rec.iqr_s, rec.runs = time_cuda(step, min_time)
            rec.peak_mem_bytes = torch.cuda.max_memory_allocated(device) - base
        else:
            rec.median_s, rec.iqr_s, rec.runs = time_cpu(step, min_time)
        rec.chars_per_s = size.B * size.T / rec.median_s
    except Exception as e:  # a failing provider is recorded, and the sweep goes on
        rec.error = f"{type(e).__name__}: {e}"[:500]
    return rec


def combine_rounds(recs: list[Record]) -> Record:
    """One provider's record from its interleaved rounds: the median of the rounds' medians (a failed round
    makes the record a failure). The rounds' medians are kept in extra["round_medians_s"]."""
    failed = [r for r in recs if r.median_s is None]
    if len(recs) == 1 or failed:
        return (failed or recs)[0]
    rec = recs[0]
    medians = [r.median_s for r in recs]
    q = statistics.quantiles(medians, n=4)
    rec.median_s, rec.iqr_s, rec.runs = statistics.median(medians), q[2] - q[0], sum(r.runs for r in recs)
    rec.chars_per_s = rec.B * rec.T / rec.median_s
    peaks = [r.peak_mem_bytes for r in recs if r.peak_mem_bytes is not None]
    rec.peak_mem_bytes = max(peaks) if peaks else None
    rec.extra["round_medians_s"] = medians
    return rec


def add_speedups(records: list[Record]) -> None:
    """speedup_vs_lstm = t(nn.LSTM) / t(provider), for the same suite, size, mode and dtype in this run."""
    key = lambda r: (r.suite, r.B, r.T, r.H, r.L, r.mode, r.dtype)  # noqa: E731
    lstm = {key(r): r.median_s for r in records if r.provider == "lstm" and r.median_s}
    for r in records:
        if r.median_s and key(r) in lstm:
            r.speedup_vs_lstm = lstm[key(r)] / r.median_s


def main(argv: Optional[list[str]] = None) -> None:
    global INPUT
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--suites", nargs="+", default=["ptb", "text8", "batch", "hidden", "steps", "copy"],
                   help="ptb, text8, batch, hidden, steps, copy (forced boundary rates), smoke (tiny, for tests)")
    p.add_argument("--providers", nargs="+", default=None,
                   help="default: every available hmlstm backend, lstm, and lstm-fp16-layers on a GPU")
    p.add_argument("--modes", nargs="+", default=["fw", "fwbw"], choices=["fw", "fwbw"])
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of timed runs per measurement")
    p.add_argument("--rounds", type=int, default=1,
                   help="interleave the providers of each size and mode over this many rounds (min-time split "
                        "between them; the order reverses every round) and report the median round: a machine "
                        "whose speed drifts over minutes then biases every provider alike")
    p.add_argument("--skip", nargs="*", default=[],
                   help="provider:suite pairs to leave out, e.g. hmlstm-reference:text8 (too slow)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--trained-ckpt", default=None,
                   help="a PTB checkpoint of `hmlstm fit --config ptb.yaml`: enables the trained suite")
    p.add_argument("--ptb-dir", default=None, help="folder of ptb.char.valid.txt (the trained suite's text)")
    p.add_argument("--input-size", type=int, default=INPUT,
                   help="features of the input (default 128, the paper's character embedding)")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    INPUT = args.input_size

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    providers = args.providers or ([f"hmlstm-{b}" for b in hmlstm.available_backends(device)] + ["lstm"]
                                   + (["lstm-fp16-layers"] if device.type == "cuda" else []))
    if args.providers is None and device.type == "cuda" and "hmlstm-triton" in providers:
        providers += ["hmlstm-triton-graph", "lstm-graph"]
    PTB_DIR["path"] = args.ptb_dir
    if "trained" in args.suites and args.trained_ckpt is None:
        raise SystemExit("--suites trained needs --trained-ckpt (and --ptb-dir)")
    table = suites(args.device, args.trained_ckpt)
    unknown = [s for s in args.suites if s not in table]
    if unknown:
        raise SystemExit(f"--suites: unknown {unknown}; choose from {sorted(table)}")
    result = {"header": header(device) | {"input_size": INPUT}, "records": []}
    if args.trained_ckpt is not None:
        ck = torch.load(args.trained_ckpt, map_location="cpu", weights_only=False)
        result["header"]["trained_ckpt"] = {"path": args.trained_ckpt, "epoch": ck.get("epoch"),
                                            "global_step": ck.get("global_step")}
    records: list[Record] = []
    todo = [(s, size, prov, mode, dt) for s in args.suites for size in table[s] for dt in args.dtypes
            for mode in args.modes for prov in providers
            # nn.LSTM has no boundaries: it is measured once per size, at the 100% rate
            if f"{prov}:{s}" not in args.skip and not (not prov.startswith("hmlstm-")
                                                       and size.rate not in (None, 1.0))
            and not (prov == "lstm-fp16-layers" and dt != "float32")]
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    # cells: the providers of one suite, size, mode and dtype, measured together (interleaved with --rounds)
    cells: dict[tuple, list[str]] = {}
    for suite, size, prov, mode, dt in todo:
        cells.setdefault((suite, size, mode, dt), []).append(prov)
    n = 0
    for (suite, size, mode, dt), provs in cells.items():
        rounds: dict[str, list[Record]] = {prov: [] for prov in provs}
        for k in range(args.rounds):
            for prov in (provs if k % 2 == 0 else provs[::-1]):
                rounds[prov].append(measure(suite, prov, mode, size, getattr(torch, dt), device,
                                            args.min_time / args.rounds))
        for prov in provs:
            rec = combine_rounds(rounds[prov])
            records.append(rec)
            n += 1
            shown = f"{rec.median_s * 1e3:9.2f} ms" if rec.median_s else f"FAILED {rec.error}"
            print(f"[{n}/{len(todo)}] {suite:6s} {prov:18s} {mode:4s} {dt:8s} B={size.B:<3d} T={size.T:<4d} "
                  f"H={size.H:<4d} rate={size.rate} {shown}", flush=True)
        add_speedups(records)
        result["records"] = [asdict(r) for r in records]
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:  # written after every cell: an interrupted sweep keeps what it measured
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)
    print(f"wrote {len(records)} records to {args.out}")


if __name__ == "__main__":
    main()
