"""fengine's benchmark suite: every engine on the same work, in fresh interleaved processes.

Workloads (bench/workloads.py): a tiny MLP, the classify recipe's CNN on digits, a small
character GPT. Engines (bench/engines.py): the hand-written loop with AdamW foreach
(the reference) and fused, fengine's eager step in a plain loop, ``fe.fit`` with its
default handlers, the compiled step, MMEngine's Runner and Lightning's Trainer when
installed. Same initial weights, data and order, fed by a plain list and by one
``torch.utils.data.DataLoader``. Each (workload, engine, feed) runs in a fresh process,
rounds interleave the engines so they share the machine's noise, and the table gives
the median steps/s of the rounds, the ratio to the hand-written loop on the same feed,
the peak RSS and whether the final parameters equal the hand-written loop's bit for bit.
Every process first fixes glibc's malloc thresholds (`fengine.allocator`, as the recipes do on
CPU; ``--malloc default`` leaves them dynamic): otherwise a compiled step's speed can differ
by a third from one process to the next.
Checkpoint rows come from bench/checkpoint_io.py. The table goes to bench/RESULTS.md
with the command, versions, machine and thread count.

    python bench/run.py            # the whole suite
    python bench/run.py --quick    # ~3-4 minutes on 2 cores; last line: mlp compiled ratio X.XX
    python bench/run.py --quick --device cuda   # on a GPU (quick engines, full step counts): a section of RESULTS.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch


HERE = Path(__file__).resolve().parent
STEPS = {"mlp": 2000, "cnn": 400, "gpt": 150}
QUICK_STEPS = {"mlp": 1000, "cnn": 60, "gpt": 30}
QUICK_LOADER_ENGINES = ("hand", "fit", "mmengine", "lightning")  # --quick: the loader feed's rows
ENGINE_ORDER = ("hand", "hand_fused", "step", "fit", "compiled", "mmengine", "lightning")
OPTIONAL = {"mmengine": "mmengine", "lightning": "lightning"}
LOADER_ONLY = ("mmengine", "lightning")


def digest(params: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def worker(args: argparse.Namespace) -> None:
    """One measurement in this process; prints one JSON line."""
    torch.set_num_threads(args.threads)
    if args.malloc == "steady":
        from fengine.allocator import steady_cpu_allocations

        steady_cpu_allocations()  # for every engine alike
    sys.path.insert(0, str(HERE))
    from engines import ENGINES, feed
    from workloads import workload

    w = workload(args.workload, args.device)
    data = feed(w, args.feed, args.steps)
    try:
        seconds, params = ENGINES[args.engine](w, data, args.steps, args.warmup)
        rate = (args.steps - args.warmup) / seconds if seconds == seconds else None
        out = {"steps_per_s": rate, "digest": digest(params) if params else None}
    except Exception as e:  # the row says why; the suite goes on
        out = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def measure(
    workload: str, engine: str, feed: str, steps: int, warmup: int, threads: int, device: str,
    malloc: str,
) -> dict:  # fmt: skip
    cmd = [sys.executable, __file__, "--worker", "--device", device, "--workload", workload, "--engine", engine,
           "--feed", feed, "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads),
           "--malloc", malloc]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


@dataclass
class Row:
    workload: str
    engine: str
    feed: str
    rates: list[float]
    rss: list[float]
    digests: set[str]
    error: str | None = None

    @property
    def rate(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None


def installed(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None


def run_suite(args: argparse.Namespace, rows: dict[tuple[str, str, str], Row]) -> None:
    """Measures every (workload, engine, feed) into ``rows`` as it goes (a stopped run keeps them)."""
    # a device runs the full counts in seconds; quick's few CPU updates would time launch noise there
    steps = QUICK_STEPS if args.quick and args.device == "cpu" else STEPS
    if args.steps:
        steps = dict.fromkeys(steps, args.steps)
    engines = [e for e in ENGINE_ORDER if e not in OPTIONAL or installed(OPTIONAL[e])]
    feeds = args.feeds
    for workload in args.workloads:
        n = steps[workload]
        warmup = max(2, n // 10)
        for r in range(args.rounds):
            for feed in feeds:
                order = engines if r % 2 == 0 else engines[::-1]  # interleaved, both directions
                for engine in order:
                    if engine in LOADER_ONLY and feed == "list":
                        continue  # MMEngine's Runner and Lightning's Trainer take a DataLoader
                    if args.quick and feed == "loader" and engine not in QUICK_LOADER_ENGINES:
                        continue
                    out = measure(
                        workload, engine, feed, n, warmup, args.threads, args.device, args.malloc
                    )
                    row = rows.setdefault(
                        (workload, engine, feed), Row(workload, engine, feed, [], [], set())
                    )
                    if "error" in out:
                        row.error = out["error"]
                        continue
                    row.rates.append(out["steps_per_s"])
                    row.rss.append(out["peak_rss_mb"])
                    row.digests.add(out["digest"])
                    print(
                        f"  {workload:4} {feed:6} {engine:10} {out['steps_per_s']:9.1f} steps/s",
                        flush=True,
                    )


def table(rows: list[Row]) -> list[str]:
    lines = ["| workload | feed | engine | steps/s | ratio | peak RSS MB | params == hand |",
             "|---|---|---|---:|---:|---:|---|"]  # fmt: skip
    ref = {(r.workload, r.feed): r for r in rows if r.engine == "hand"}
    for r in rows:
        base = ref.get((r.workload, r.feed))
        if r.rate is None:
            lines.append(f"| {r.workload} | {r.feed} | {r.engine} | - | - | - | {r.error} |")
            continue
        ratio = r.rate / base.rate if base and base.rate else float("nan")
        same = base is not None and len(r.digests) == 1 and r.digests == base.digests
        lines.append(f"| {r.workload} | {r.feed} | {r.engine} | {r.rate:.1f} | {ratio:.2f} | "
                     f"{statistics.median(r.rss):.0f} | {'yes' if same else 'no'} |")  # fmt: skip
    return lines


def checkpoint_rows(args: argparse.Namespace) -> list[str]:
    gb = args.checkpoint_gb or (0.25 if args.quick else 1.0)
    cmd = [
        sys.executable,
        str(HERE / "checkpoint_io.py"),
        "--gb",
        str(gb),
        "--repeats",
        "1" if args.quick else "3",
        "--device",
        args.device,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE)
    out = done.stdout.strip().splitlines() or [
        f"checkpoint_io.py failed: {done.stderr.strip()[-200:]}"
    ]
    return ["```", *out, "```"]


def write_results(
    args: argparse.Namespace, lines: list[str], ckpt: list[str], seconds: float
) -> None:
    command = "python bench/run.py " + " ".join(sys.argv[1:])
    header = [
        "# Benchmark results",
        "",
        f"Command: `{command.strip()}` ({seconds / 60:.1f} min, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}; torch intra-op threads {args.threads}; malloc thresholds {args.malloc}",
        f"Versions: Python {platform.python_version()}, torch {torch.__version__}"
        + "".join(f", {m} {_version(m)}" for m in ("mmengine", "lightning") if installed(m)),
        "",
        "Steps/s: median over rounds of fresh processes, after the first 10 % of updates (warm-up,",
        "compilation). Ratio: to the hand-written AdamW(foreach) loop on the same feed. The last",
        "column: final parameters bitwise equal to the hand-written loop's.",
        "",
    ]
    out = Path(args.out)
    if args.device != "cpu":  # a device's table goes beside the CPU one, in the same file
        gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else ""
        section = [f"## On {args.device} ({gpu})", "", *header[2:5], "", *lines, "",
                   "Checkpoints, the async-stall rows training on the device:", "", *ckpt, ""]  # fmt: skip
        before = out.read_text() if out.exists() else "\n".join(header[:1] + [""])
        out.write_text(before.rstrip("\n") + "\n\n" + "\n".join(section))
        return
    kept = ""  # other devices' sections stay (a CPU run on a machine without their device)
    if out.exists() and (at := out.read_text().find("\n## On ")) >= 0:
        kept = "\n" + out.read_text()[at + 1 :]
    out.write_text("\n".join([*header, *lines, "", "## Checkpoints", "", *ckpt, ""]) + kept)


def _version(module: str) -> str:
    from importlib.metadata import version

    return version(module)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="fewer steps, 1 round, the loader feed for the hand loop, fit and MMEngine only",
    )
    ap.add_argument(
        "--feeds",
        nargs="+",
        choices=["list", "loader"],
        help="plain list and/or DataLoader (default both; quick: every engine on the list, "
        "the hand loop, fit and MMEngine/Lightning on the loader)",
    )
    ap.add_argument(
        "--rounds", type=int, default=None, help="fresh-process repeats (default 3; quick 1)"
    )
    ap.add_argument(
        "--workloads", nargs="+", default=["mlp", "cnn", "gpt"], choices=["mlp", "cnn", "gpt"]
    )
    ap.add_argument(
        "--threads", type=int, default=2, help="torch intra-op threads (bits depend on it)"
    )
    ap.add_argument(
        "--out",
        default=str(HERE / "RESULTS.md"),
        help="the results file (another --device than cpu adds its section to it)",
    )
    ap.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:N (models and batches there)"
    )
    ap.add_argument(
        "--steps", type=int, default=None, help="updates per run for every workload (smoke tests)"
    )
    ap.add_argument(
        "--checkpoint-gb", type=float, default=None, help="state size of the checkpoint rows"
    )
    ap.add_argument(
        "--malloc",
        choices=["steady", "default"],
        default="steady",
        help="fix glibc's malloc thresholds in every process (fengine.allocator), or leave them",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("--feed", help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.feeds = args.feeds or ["list", "loader"]
    t0 = time.perf_counter()
    measured: dict[tuple[str, str, str], Row] = {}
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout`: keep what was measured
    try:
        run_suite(args, measured)
        stopped = None
    except KeyboardInterrupt:
        stopped = (
            f"stopped after {len(measured)} rows (SIGTERM or Ctrl-C): the rows measured so far"
        )
        print(stopped, flush=True)
    rows = list(measured.values())
    lines = table(rows)
    ckpt = checkpoint_rows(args) if stopped is None else [stopped]
    write_results(args, lines, ckpt, time.perf_counter() - t0)
    print("\n".join(lines + [""] + ckpt))
    print(f"results: {args.out}")
    compiled = next(  # the list feed when run: the engine's own cost, no loader in it
        (
            r
            for f in ("list", "loader")
            for r in rows
            if r.workload == "mlp" and r.engine == "compiled" and r.feed == f
        ),
        None,
    )
    hand = next(
        (
            r
            for r in rows
            if r.workload == "mlp" and r.engine == "hand" and compiled and r.feed == compiled.feed
        ),
        None,
    )
    if compiled and hand and compiled.rate and hand.rate:
        print(f"mlp compiled ratio {compiled.rate / hand.rate:.2f}")
    else:
        print(f"mlp compiled ratio n/a ({compiled.error if compiled else 'mlp not run'})")


if __name__ == "__main__":
    main()
