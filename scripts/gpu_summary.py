"""The headline figures of each step of scripts/gpu_check.sh, read back from what the step left.

    python3 scripts/gpu_summary.py env LOG
    python3 scripts/gpu_summary.py pytest LOG
    python3 scripts/gpu_summary.py bench LOG --json bench.json
    python3 scripts/gpu_summary.py kernel LOG --json kernel_check.json
    python3 scripts/gpu_summary.py ddp LOG --json ddp_check.json
    python3 scripts/gpu_summary.py train LOG --metrics metrics.jsonl [--since STEP]

Prints one line of `key=value` pairs joined by "; ": the figures of the step's row in summary.tsv.
Exits 1 where the figures show a failure that the step's exit status hid (pytest ran no test), else
0, also when a file is missing or unreadable: the line then says so, because a summary line must
come back even from a broken run. Standard library only: it runs after every step on the GPU
machine, and in the CPU tests.

MFU is quoted twice: against the datasheet peak that bench.py and train.py use (mlm/flops.py: 989
TFLOP/s bf16 dense for an H200 SXM), and against the peak measured on the H200 lent to this project
(about 790 TFLOP/s, an 8192^3 bf16 matmul), which is what code could reach there.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DATASHEET_TFLOPS = 989.0  # H200 SXM, bf16 dense: what train.py's mfu is against (mlm/flops.py)
MEASURED_TFLOPS = 790.0  # an 8192^3 bf16 matmul on the lent H200


def pairs(items: dict) -> str:
    return "; ".join(f"{k}={v}" for k, v in items.items() if v is not None)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def judged(row: dict) -> str:
    """A bench.py row's target and whether it was met, as its table says it."""
    return f", {row['target']}: {'met' if row['met'] else 'NOT MET'}" if row.get("target") else ""


def last_line(log: str) -> str:
    """The last thing the step printed (what a progress bar left after its last carriage return)."""
    lines = [line.rsplit("\r", 1)[-1].strip() for line in log.splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:200] if lines else "(empty log)"


def recompiles(log: str) -> str:
    """How often Dynamo recompiled (TORCH_LOGS=recompiles), and where and why the first time."""
    count = len(re.findall(r"Recompiling function", log))
    first = re.search(
        r"Recompiling function (\S+) in (\S+)[^\n]*\n[^\n]*triggered by the following "
        r"guard failure\(s\):[^\n]*\n[^\n]*?- ([^\n]+)",
        log,
    )
    if not count or not first:
        return str(count)
    function, where, guard = first.groups()
    return f"{count} (first: {function} at {where}, {guard.strip()[:120]})"


# ---------------------------------------------------------------------------------------- the steps
def env_figures(log: str) -> dict:
    """The `key: value` lines that gpu_check.sh's env step prints."""
    facts = dict(re.findall(r"^(\w+): (.*)$", log, flags=re.MULTILINE))
    keys = ("gpu", "driver", "torch", "triton", "transformers", "python", "cores", "code", "git")
    return {k: facts.get(k, "?") for k in keys}


def pytest_figures(log: str) -> tuple[dict, bool]:
    """Counts from pytest's closing line, the failed tests and the modules that did not collect, and
    whether that counts as a pass: some test must have passed, since all skipped (a CPU-only torch)
    or none collected is pytest's exit 0 or 5 but no proof of anything."""
    closing = [
        line
        for line in log.splitlines()
        if re.search(
            r"\b(passed|failed|skipped|errors?|deselected|no tests ran)\b.* in [\d.]+s", line
        )
    ]
    if not closing:
        return {
            "pytest": "no closing line (stopped before the end?)",
            "last": last_line(log),
        }, False
    counts = {
        word.rstrip("s") if word.startswith("error") else word: int(n)
        for n, word in re.findall(
            r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", closing[-1]
        )
    }
    figures: dict = {k: counts.get(k, 0) for k in ("passed", "failed", "skipped", "error")}
    failed = re.findall(r"^FAILED (\S+)", log, flags=re.MULTILINE)
    broken = re.findall(r"^ERROR (\S+)(?: - (.*))?$", log, flags=re.MULTILINE)
    if failed:
        figures["failed_tests"] = ", ".join(failed[:5]) + (" ..." if len(failed) > 5 else "")
    if broken:
        figures["errors_in"] = ", ".join(
            f"{where} ({why[:80]})" if why else where for where, why in broken[:5]
        )
    ok = figures["passed"] > 0
    if not ok:
        figures["verdict"] = "no test passed (all skipped or none collected): counted as a failure"
    return figures, ok


def bench_figures(result: dict, measured_tflops: float) -> dict:
    """Per training configuration: tokens/s ours and HF's and their ratio, MFU, HFU, peak memory,
    and the targets bench.py judged."""
    rows = [r for r in result.get("results", []) if r["section"] == "train"]
    configs: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        configs.setdefault((r["size"], r["seq"], r["dtype"]), {})[r["metric"]] = r
    figures = {}
    for (size, seq, dtype), m in configs.items():
        parts = []
        if "throughput" in m:
            r = m["throughput"]
            speed = f"tokens_per_s ours {r['ours']:,.0f} hf {r['hf']:,.0f}"
            parts.append(f"{speed} ({r['gain']:.2f}x{judged(r)})")
        for name in ("MFU", "HFU"):
            if name in m:
                r = m[name]
                peak = r["extra"]["peak_tflops"]
                scale = peak / measured_tflops
                parts.append(
                    f"{name} ours {pct(r['ours'])} hf {pct(r['hf'])} of {peak:.0f} TFLOP/s, "
                    f"{pct(r['ours'] * scale)} / {pct(r['hf'] * scale)} of {measured_tflops:.0f} "
                    f"measured{judged(r)}"
                )
        if "MFU" not in m:
            parts.append("MFU n/a (no peak known for this GPU: pass --peak-tflops)")
        if "peak memory" in m:
            r = m["peak memory"]
            parts.append(f"peak_memory ours {r['ours']:.1f} GiB hf {r['hf']:.1f} GiB")
        figures[f"{size} seq {seq} {dtype}"] = ", ".join(parts)
    if not figures:
        figures["train"] = "no training rows in the JSON"
    parity = result.get("parity_max_abs_logit_diff") or {}
    figures["parity"] = ", ".join(f"{name} {diff:.1e}" for name, diff in parity.items()) or None
    return figures


def kernel_figures(result: dict) -> dict:
    """Cases within bounds; per dtype the largest loss and gradient errors, ours beside the
    reference's; time and memory at the largest vocabulary; the failed cases by name."""
    rows = result.get("results", [])
    figures: dict = {"cases_ok": f"{sum(r['ok'] for r in rows)}/{len(rows)}"}
    scored = [r for r in rows if r["case"] == "rows"]
    for dtype in dict.fromkeys(r["dtype"] for r in scored):
        mine = [r for r in scored if r["dtype"] == dtype]
        loss = (
            max(r["errors"]["loss"]["ours"] for r in mine),
            max(r["errors"]["loss"]["reference"] for r in mine),
        )
        grad = max(r["grad_error_ours"] for r in mine), max(r["grad_error_reference"] for r in mine)
        figures[f"{dtype} max error"] = (
            f"loss {loss[0]:.1e} (reference {loss[1]:.1e}), "
            f"grad {grad[0]:.1e} (reference {grad[1]:.1e})"
        )
    if scored:
        big = max(r["V"] for r in scored)
        r = next(r for r in scored if r["V"] == big)
        memory = (
            ""
            if r["peak_mib_ours"] is None
            else f", peak {r['peak_mib_ours']:,.0f} MiB vs {r['peak_mib_reference']:,.0f}"
        )
        figures[f"V={big} {r['dtype']} {r['mode']}"] = (
            f"{r['ms_ours']:.2f} ms vs reference {r['ms_reference']:.2f} ms{memory}"
        )
    failed = [f"V={r['V']} {r['dtype']} {r['mode']} {r['case']}" for r in rows if not r["ok"]]
    figures["failed"] = ", ".join(failed) or None
    return figures


def ddp_figures(result: dict) -> dict:
    worst = max(result["steps"], key=lambda s: s["worst_error"])
    return {
        "ok": result["ok"],
        "worst_error": f"{worst['worst_error']:.2e} ({worst['worst_of']})",
        "tolerance": f"{result['tolerance']:.0e}",
        "run": f"{result['world']} rank(s), {result['backend']} on {result['device']}",
        "dtype": result["dtype"],
    }


def clean_intervals(records: list[dict], since: int = 0) -> list[tuple[int, dict]]:
    """(steps, line) for each interval of a train.py run after step `since` that is free of set-up.

    train.py's `tokens_per_s` (Meter.step) is measured over the steps since the previous training
    line, or, for a process's first line, since its loop began: that one includes compilation (and a
    resume's set-up). An interval is clean when the line before it is a training line of the same
    process. The first line after `since` (0, or the step a resumed process started from) is the
    first of a process; after an evaluation line (the baseline at step 0, the evaluation that ends a
    run before its resume, one every --eval-every) the interval holds that evaluation's time too.
    """
    intervals, previous = [], None
    for r in (r for r in records if r["step"] > since):
        if previous is not None and "tokens_per_s" in r and "tokens_per_s" in previous:
            intervals.append((r["step"] - previous["step"], r))
        previous = r
    return intervals


def throughput(intervals: list[tuple[int, dict]]) -> float:
    """Tokens/s over all the intervals together, their steps over their seconds: a shorter last
    interval (--max-steps not a multiple of --log-every) weighs by its steps, not as a whole one."""
    return sum(n for n, _ in intervals) / sum(n / r["tokens_per_s"] for n, r in intervals)


def train_figures(
    records: list[dict],
    since: int = 0,
    tokens_per_step: int | None = None,
    datasheet_tflops: float = DATASHEET_TFLOPS,
    measured_tflops: float = MEASURED_TFLOPS,
) -> dict:
    """Throughput, MFU and HFU over the clean intervals after `since`; the first interval's time;
    the losses."""
    intervals = clean_intervals(records, since)
    records = [r for r in records if r["step"] > since]
    train = [r for r in records if "tokens_per_s" in r]
    figures: dict = {}
    if intervals:
        rate = throughput(intervals)
        spans = ", ".join(f"{r['step'] - n}-{r['step']}" for n, r in intervals)
        figures["tokens_per_s"] = f"{rate:,.0f} (over steps {spans})"
        last = intervals[-1][1]
        # Utilisation is proportional to throughput, interval by interval.
        for name in ("mfu", "hfu"):
            if name in last:
                value = rate * last[name] / last["tokens_per_s"]
                figures[name] = (
                    f"{pct(value)} of {datasheet_tflops:.0f} TFLOP/s, "
                    f"{pct(value * datasheet_tflops / measured_tflops)} of "
                    f"{measured_tflops:.0f} measured"
                )
        if "mfu" not in last:
            figures["mfu"] = "n/a (train.py knows no peak for this GPU)"
    else:
        figures["tokens_per_s"] = (
            f"n/a ({len(train)} training line(s) after step {since}, none after "
            "the first of its process, which includes compilation)"
        )
    if train and tokens_per_step:
        first = train[0]
        seconds = (first["step"] - since) * tokens_per_step / first["tokens_per_s"]
        figures["first_log"] = (
            f"step {first['step']} after {seconds:.1f} s (compilation included, "
            f"{first['tokens_per_s']:,.0f} tokens/s)"
        )
    if train:
        figures["loss"] = f"{train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}"
    evals = [r for r in records if "val_loss" in r]
    if evals:
        figures["val_loss"] = f"{evals[-1]['val_loss']:.3f} at step {evals[-1]['step']}"
    return figures


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- cli
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=["env", "pytest", "bench", "kernel", "ddp", "train"])
    p.add_argument("log", help="the step's log")
    p.add_argument("--json", help="bench, kernel, ddp: the JSON the step wrote")
    p.add_argument("--metrics", help="train: the run's metrics.jsonl")
    p.add_argument("--since", type=int, default=0, help="train: the step this process started from")
    p.add_argument("--tokens-per-step", type=int, help="train: global batch x block size")
    p.add_argument(
        "--model-config", help="train: the exported config.json, for the vocabulary size"
    )
    p.add_argument("--tokenizer", help="train: where the tokenizer came from, as gpu_check.sh says")
    p.add_argument(
        "--datasheet-tflops",
        type=float,
        default=DATASHEET_TFLOPS,
        help="train: the peak train.py's mfu is against (mlm/flops.py)",
    )
    p.add_argument(
        "--measured-tflops",
        type=float,
        default=MEASURED_TFLOPS,
        help="the bf16 matmul peak measured on the machine",
    )
    p.add_argument(
        "--rc", type=int, default=0, help="the step's exit status: if not 0, its last line is added"
    )
    return p.parse_args(argv)


def figures_of(args: argparse.Namespace) -> tuple[dict, bool]:
    log_path = Path(args.log)
    log = log_path.read_text(errors="replace") if log_path.is_file() else ""
    ok = True
    figures: dict = {}
    if args.kind == "env":
        figures = env_figures(log)
    elif args.kind == "pytest":
        figures, ok = pytest_figures(log)
    elif args.kind == "train":
        metrics = Path(args.metrics) if args.metrics else None
        if metrics is not None and metrics.is_file():
            figures = train_figures(
                read_jsonl(metrics),
                args.since,
                args.tokens_per_step,
                args.datasheet_tflops,
                args.measured_tflops,
            )
        else:
            figures = {"metrics": f"none ({args.metrics} was not written)"}
        figures["recompiles"] = recompiles(log)
        config = Path(args.model_config) if args.model_config else None
        if config is not None and config.is_file():
            vocab = json.loads(config.read_text())["vocab_size"]
            figures["vocab_size"] = f"{vocab:,}" + (
                "" if vocab == 30522 else " (not bert-base's 30,522: MFU is another model's)"
            )
        params = re.search(r"model, ([\d.]+M) parameters", log)
        figures["params"] = params.group(1) if params else None
        figures["tokenizer"] = args.tokenizer
    else:
        path = Path(args.json) if args.json else None
        if path is None or not path.is_file():
            figures = {"json": f"none ({args.json} was not written)"}
        else:
            result = json.loads(path.read_text())
            if args.kind == "bench":
                figures = bench_figures(result, args.measured_tflops)
            elif args.kind == "kernel":
                figures = kernel_figures(result)
            else:
                figures = ddp_figures(result)
    if args.rc:
        figures["last_line"] = last_line(log)
    return figures, ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        figures, ok = figures_of(args)
    except Exception as e:  # noqa: BLE001  (a summary line comes back whatever the step left)
        print(f"figures unreadable ({type(e).__name__}: {e})")
        return 0
    print(pairs(figures).replace("\t", " ").replace("\n", " "))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
