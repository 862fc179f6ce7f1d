"""GPU check, last step: the summary of what ``gpu_check.sh`` ran, pass or fail, and on what.

Reads the steps file that ``gpu_check.sh`` writes (one tab-separated line per step: name, exit
status or ``-`` when not run, seconds, timeout, the results files it should write (a glob under
``benchmarks/results``, or ``-``), command), the preflight's JSON, ``nvidia-smi``'s answer and
the kernel tests' JUnit XML, all in ``--logs``. A step passes when it exited 0 and wrote (after
``--logs``/.start) the results files it should; the kernel tests also need no Triton or CUDA
test skipped and some Triton test passed. Writes ``benchmarks/results/gpu-check-<device>.md``,
prints it, and exits 1 when anything failed.

Usage: python benchmarks/gpu_summary.py --logs DIR [--budget SECONDS] [--command TEXT]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common

TAIL_LINES = 25
NOT_RUN_HERE = (
    "Not run by this check: bench_busy.py (a busy-CPU benchmark) and bench_live.py (napari's live "
    "preview), CPU / napari benchmarks, not GPU ones."
)


def junit_report(path: Path) -> tuple[str, list[str]]:
    """``(one-line tally, problems)`` of the kernel tests' JUnit XML."""
    if not path.exists():
        return "no JUnit report", ["the kernel tests wrote no JUnit report"]
    root = ET.parse(path).getroot()
    cases = list(root.iter("testcase"))
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    skips: dict[str, int] = {}
    triton_passed = 0
    for case in cases:
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                if child.tag == "skipped":
                    reason = child.get("message", "")
                    skips[reason] = skips.get(reason, 0) + 1
                break
        counts[outcome] += 1
        if outcome == "passed" and "triton" in case.get("classname", ""):
            triton_passed += 1
    tally = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no tests"
    tally += f" ({triton_passed} of them in the Triton test files)"
    problems = []
    for reason, n in skips.items():
        tally += f"; skipped {n}x: {reason}"
        if "triton" in reason.lower() or "cuda" in reason.lower():
            problems.append(f"{n} test(s) skipped for want of Triton or CUDA: {reason}")
    if triton_passed == 0:
        problems.append("no Triton test passed")
    return tally, problems


def _tail(path: Path) -> str:
    if not path.exists():
        return "(no log)"
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-TAIL_LINES:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=None, help="the check's time budget (s)")
    parser.add_argument("--command", default="bash benchmarks/gpu_check.sh")
    args = parser.parse_args()
    logs = args.logs
    start = (logs / ".start").stat().st_mtime
    info = {}
    if (logs / "preflight.json").exists():
        info = json.loads((logs / "preflight.json").read_text())
    smi = (
        (logs / "nvidia-smi.txt").read_text().strip() if (logs / "nvidia-smi.txt").exists() else ""
    )
    name = common.device_name("cuda")

    rows, failures = [], []
    for line in (logs / "steps.tsv").read_text().splitlines():
        step, rc, seconds, timeout, expect, command = line.split("\t")
        problems = []
        if rc == "skip":
            rows.append(f"| {step} | skipped (--skip) | - | - | - | `{command}` |")
            continue
        if rc == "-":
            problems.append("not run: no time left in the budget")
        elif rc in ("124", "137"):
            problems.append(f"timed out after {timeout} s")
        elif rc != "0":
            problems.append(f"exit status {rc}")
            log = logs / f"{step}.log"
            text = log.read_text(errors="replace") if log.exists() else ""
            missing = sorted(set(re.findall(r"No module named '([\w.]+)'", text)))
            if missing:
                problems.append(
                    f"missing module(s) {', '.join(missing)}: install as the README says"
                )
        written = []
        if expect != "-" and rc != "-":
            written = sorted(
                p.name
                for p in common.RESULTS.glob(expect.replace("<device>", name))
                if p.stat().st_mtime >= start
            )
            if not written:
                problems.append(f"wrote no {expect.replace('<device>', name)}")
        detail = ", ".join(written) or "-"
        if step == "kernel-tests" and rc != "-":
            tally, test_problems = junit_report(logs / "kernel-tests-junit.xml")
            problems += test_problems
            detail = tally
        status = "FAIL: " + "; ".join(problems) if problems else "pass"
        rows.append(f"| {step} | {status} | {seconds} | {timeout} | {detail} | `{command}` |")
        if problems:
            failures.append((step, problems, logs / f"{step}.log" if rc != "-" else None))

    total = time.time() - start
    n_skipped = sum("skipped (--skip)" in r for r in rows)
    skipped = f", {n_skipped} skipped on request" if n_skipped else ""
    device = info.get("device", name)
    budget = f" of a {args.budget:.0f} s budget" if args.budget else ""
    compiled = (
        "compiled, not interpreted"
        if info.get("kernel_types") and not info.get("problems")
        else "see the preflight: not shown to be compiled"
    )
    facts = [
        f"torch: {device}, compute capability {info.get('capability', '?')}, "
        f"{info.get('memory_gib', '?')} GiB, {info.get('multiprocessors', '?')} SMs; torch "
        f"{info.get('torch', '?')} (CUDA {info.get('torch_cuda', '?')}), Triton "
        f"{info.get('triton', 'not importable')}, Python {info.get('python', '?')}",
        f"nvidia-smi: {smi or 'not available'}",
        f"Kernels: {info.get('kernel_types', '?')}, TRITON_INTERPRET="
        f"{info.get('TRITON_INTERPRET', '?')!r} ({compiled}); smoke rel. errors of Triton on "
        f"CUDA vs the CPU torch path: {info.get('smoke_rel_errors', '?')}",
        f"Code: napari_pacseg from {info.get('napari_pacseg_from', '?')}, pacseg_kernels from "
        f"{info.get('pacseg_kernels_from', '?')}",
    ]
    lines = [
        f"# GPU check, {name}",
        "",
        f"Command: `{args.command}` ({time.strftime('%Y-%m-%d %H:%M', time.localtime(start))}), "
        f"{total:.0f} s{budget}.  ",
        *(f + "  " for f in facts),
        NOT_RUN_HERE,
        "",
        "| step | status | s | timeout s | results / tests | command |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"**Overall: {'FAIL' if failures else 'PASS'}** "
        f"({len(failures)} of {len(rows)} steps failed{skipped}). The benchmarks' results files give "
        "every time also as a fraction of its counted floor (each file's 'Ceilings' line has "
        "the measured bandwidth and mm rate); bench_quality's are end-to-end times (no floor).",
    ]
    for step, problems, log in failures:
        if log is not None:
            lines += ["", f"## {step}: {'; '.join(problems)}", "", "```", _tail(log), "```"]
    path = common.write_result(f"gpu-check-{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten to {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
