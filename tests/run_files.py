"""Run each test file in a pytest process of its own, then print one closing line for the whole suite.

    .venv/bin/python tests/run_files.py [--jobs N] [pytest options]

Why one process per file: the runtimes under test (Inductor, ONNX Runtime, OpenVINO, LiteRT, TensorFlow)
keep thread pools, caches and fork handlers for the life of a process, and a long single process that had
run them all crashed with SIGSEGV at a later fork (see tests/test_deploy.py's temp checks). A file is the
unit the tests were written for (module fixtures), and a crash is then reported against its file instead of
ending the run. Exit status 1 if any file failed, errored or crashed.

``--jobs N`` (default 1; ``make test JOBS=2``) runs up to N files at once, the slowest first (durations of
the last run, kept in the checkout's ignored ``.test-cache/durations.json``), so the long files overlap
instead of ending the run one after another. Files can run side by side because each test process has its
own cache folder (tests/conftest.py) and the files that measure time (``SERIAL``) run alone, after the rest.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
DURATIONS = TESTS.parent / ".test-cache" / "durations.json"
COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")
# files whose assertions compare timings (benchmark figures, the runtime picked by measuring): another file
# running beside them would change what they measure
SERIAL = {"test_benchmark.py", "test_pick.py", "test_deploy.py", "test_device_latency.py"}


def _order(paths: list[Path]) -> list[Path]:
    known = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    return sorted(paths, key=lambda p: -known.get(p.name, 60.0))  # unknown files: a minute


def main(argv: list[str]) -> int:
    jobs = 1
    if argv[:1] == ["--jobs"] and len(argv) > 1:
        jobs, argv = max(1, int(argv[1])), argv[2:]
    totals = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    bad: list[str] = []
    durations: dict[str, float] = {}
    start = time.time()
    paths = sorted(TESTS.glob("test_*.py"))
    parallel = _order([p for p in paths if p.name not in SERIAL]) if jobs > 1 else paths
    serial = [p for p in paths if p.name in SERIAL] if jobs > 1 else []
    running: list[tuple[Path, subprocess.Popen, float, tuple]] = []

    def finish(path: Path, proc: subprocess.Popen, began: float, files: tuple) -> None:
        proc.wait()
        out, err = (f.seek(0) or f.read() for f in files)
        for f in files:
            f.close()
        durations[path.name] = round(time.time() - began, 1)
        if proc.returncode not in (0, 5):  # what went wrong, in the file's own words
            sys.stdout.write(out[-6000:] + err[-3000:])
        closing = out.strip().splitlines()[-1] if out.strip() else ""
        found = {kind: int(n) for n, kind in COUNTS.findall(closing)}
        for kind, n in found.items():
            key = "error" if kind.startswith("error") else kind
            if key in totals:
                totals[key] += n
        if proc.returncode not in (0, 5):
            bad.append(f"{path.name} (exit {proc.returncode})")
            if not found.get("failed") and not found.get("error") and not found.get("errors"):
                totals["failed"] += 1  # a crash: count the file as one failure
        print(f"{path.name}: {closing or 'no summary'}", flush=True)

    def launch(path: Path) -> None:
        # output to temporary files, not pipes: a file whose output outgrows a pipe nobody reads would block
        files = (tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+"))
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", *argv, str(path)], stdout=files[0],
                                stderr=files[1], text=True)
        running.append((path, proc, time.time(), files))

    for group, width in ((parallel, jobs), (serial, 1)):
        queue = list(group)
        while queue or running:
            while queue and len(running) < width:
                launch(queue.pop(0))
            done = [r for r in running if r[1].poll() is not None]
            if not done:
                time.sleep(0.2)
                continue
            for r in done:
                running.remove(r)
                finish(*r)
    if not argv:  # a whole run's durations order the next one
        DURATIONS.parent.mkdir(exist_ok=True)
        DURATIONS.write_text(json.dumps(durations, indent=1, sort_keys=True) + "\n")
    minutes = (time.time() - start) / 60
    if bad:
        print(f"files that did not pass: {', '.join(bad)}")
    print(f"all test files in {minutes:.1f} min")
    skipped = f", {totals['skipped']} skipped" if totals["skipped"] else ""
    print(f"{totals['passed']} passed, {totals['failed'] + totals['error']} failed{skipped}")
    return 1 if bad or totals["failed"] or totals["error"] else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
