"""A two-node Ray cluster on this machine, on loopback addresses only, for the tests that need one.

Ray rewrites 127.0.0.1 (and "localhost") given as --node-ip-address to the
machine's outside address, so the head listens on 127.0.0.2 and the second
node on 127.0.0.3: both loopback, and distinct, so Ray sees two nodes.
Drivers connect with the environment in ``driver_env``.
Stopping kills exactly this cluster's processes (found by its temporary folder
and its address, with their children), not every Ray process on the machine
as ``ray stop`` would.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
HEAD, SECOND = "127.0.0.2", "127.0.0.3"
START_TIMEOUT_S = 120  # each `ray start` takes about 10 s on 2 busy cores


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, temp_dir: Path, cpus_per_node: int = 2):
        self.temp_dir = temp_dir
        self.port = free_port(HEAD)
        self.address = f"{HEAD}:{self.port}"
        self.cpus = cpus_per_node
        # token authentication off for every node and driver, explicitly: with the mode unset, a token left in
        # ~/.ray by an earlier local ray.init turns it on for the head alone, and the second node is refused.
        # (The cluster listens on loopback addresses only, for the minutes a test runs.)
        # and no usage statistics: Ray Data's collector asks a Prometheus server for them at the end of each
        # run, retrying for seconds when there is none
        self.driver_env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env = {**os.environ, **self.driver_env, "RAY_TMPDIR": str(temp_dir)}

    def _ray(self, *args: str) -> None:
        done = subprocess.run([RAY, *args], env=self.env, timeout=START_TIMEOUT_S, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ray {args[0]} failed: {(done.stdout + done.stderr)[-3000:]}")

    def start(self, nodes: int = 2) -> Cluster:
        """The head, and with ``nodes=2`` a second node (benchmarks/ray_predict.py times both shapes)."""
        common = [f"--num-cpus={self.cpus}", "--disable-usage-stats"]
        self._ray("start", "--head", f"--node-ip-address={HEAD}", f"--port={self.port}", "--include-dashboard=false",
                  f"--temp-dir={self.temp_dir}", *common)
        if nodes == 2:
            self._ray("start", f"--address={self.address}", f"--node-ip-address={SECOND}", *common)
        return self

    def processes(self) -> list[int]:
        """This cluster's processes: those naming its folder or address, and everything they started."""
        roots, parent = set(), {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if str(self.temp_dir) in cmdline or self.address in cmdline:
                roots.add(int(entry.name))
        found, changed = set(roots), True
        while changed:  # add children until none is new
            grown = found | {pid for pid, ppid in parent.items() if ppid in found}
            changed, found = grown != found, grown
        return sorted(found - {os.getpid()})

    def workers(self, name: str) -> list[int]:
        """Processes of this cluster running an actor whose title names ``name`` (Ray sets ``ray::<Class>...``)."""
        found = []
        for pid in self.processes():
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::") and name in title:
                found.append(pid)
        return found

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 3
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.2)
