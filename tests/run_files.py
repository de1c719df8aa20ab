"""Run each test file in a pytest process of its own, then print one closing line for the whole suite.

    .venv/bin/python tests/run_files.py [pytest options]

Why one process per file: the runtimes under test (Inductor, ONNX Runtime, OpenVINO, LiteRT, TensorFlow)
keep thread pools, caches and fork handlers for the life of a process, and a long single process that had
run them all crashed with SIGSEGV at a later fork (see tests/test_deploy.py's temp checks). A file is the
unit the tests were written for (module fixtures), and a crash is then reported against its file instead of
ending the run. Exit status 1 if any file failed, errored or crashed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def main(argv: list[str]) -> int:
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    bad: list[str] = []
    start = time.time()
    for path in sorted(TESTS.glob("test_*.py")):
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", *argv, str(path)], capture_output=True,
                             text=True)
        if run.returncode not in (0, 5):  # what went wrong, in the file's own words
            sys.stdout.write(run.stdout[-6000:] + run.stderr[-3000:])
        closing = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
        found = {kind: int(n) for n, kind in COUNTS.findall(closing)}
        for kind, n in found.items():
            key = "error" if kind.startswith("error") else kind
            if key in totals:
                totals[key] += n
        if run.returncode not in (0, 5):
            bad.append(f"{path.name} (exit {run.returncode})")
            if not found.get("failed") and not found.get("error") and not found.get("errors"):
                totals["failed"] += 1  # a crash: count the file as one failure
        print(f"{path.name}: {closing or 'no summary'}", flush=True)
    minutes = (time.time() - start) / 60
    if bad:
        print(f"files that did not pass: {', '.join(bad)}")
    print(f"all test files in {minutes:.1f} min")
    skipped = f", {totals['skipped']} skipped" if totals["skipped"] else ""
    print(f"{totals['passed']} passed, {totals['failed'] + totals['error']} failed{skipped}")
    return 1 if bad or totals["failed"] or totals["error"] else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
