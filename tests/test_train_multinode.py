"""Training on two "nodes" of this machine: two torchrun agents meeting at a c10d rendezvous on loopback.

The reference is the 2-process single-node run (``torchrun --standalone``):
two nodes of one process each must compute exactly the same, and so must an
elastic run (``--max-restarts``) whose rank 1 is killed in the middle of
epoch 2 and restarted by its agent from the last checkpoint.  Gloo on CPU;
MobileNet 0.25 at 32 px, batch 8, two epochs of the pattern dataset.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imagefolders import make_dataset
from mobilenets import checkpoint, train
from mobilenets.train import distributed
from test_train import ROOT, assert_same_state, rows_without_timing

TIMEOUT_S = 300
# the command every node runs: the same flags as test_train's DDP runs
TRAIN = ["--recipe", "modern", "--lr", "0.002", "--alpha", "0.25", "--resolution", "32", "--epochs", "2", "-b", "8",
         "-j", "0", "--no-progress", "--no-plot"]

# rank 1 of the first attempt dies (SIGKILL, no chance to save) at its second batch after the epoch-1
# checkpoint exists: in the middle of epoch 2
KILL_RANK_1_IN_EPOCH_2 = """
import os, signal, sys
from pathlib import Path
from mobilenets import checkpoint, cli, data
out = Path(sys.argv[sys.argv.index("--out") + 1])
collate, after = data.collate, [0]
def collate_or_die(batch):
    if os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and (out / "last.pt").exists():
        after[0] += 1
        if after[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return collate(batch)
data.collate = collate_or_die
sys.exit(cli.main(sys.argv[1:]))
"""


def env():
    # loopback only: gloo's sockets on lo, the workers' store at the address the agents are given; and the
    # store not shared with the agents, the fix the restart warning names (distributed.STALE_STORE_FIX)
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
            **dict([distributed.STALE_STORE_FIX.split("=")])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def program(script: Path | None) -> list[str]:
    return [str(script)] if script else ["-m", "mobilenets"]


def two_nodes(data, out, *, script: Path | None = None, max_restarts: int = 0) -> list[subprocess.CompletedProcess]:
    """Two torchrun agents of one process each, as two machines would start them."""
    endpoint = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=multinode-test",
               "--local-addr=127.0.0.1", f"--max-restarts={max_restarts}", "--monitor-interval=0.5",
               *program(script), "train", "--data", str(data), "--out", str(out), *TRAIN]
    agents = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
              for _ in range(2)]
    done = []
    try:
        for agent in agents:
            stdout, stderr = agent.communicate(timeout=TIMEOUT_S)
            done.append(subprocess.CompletedProcess(command, agent.returncode, stdout, stderr))
    finally:
        for agent in agents:  # an agent still waiting must not outlive the test (it holds ports and cores)
            if agent.poll() is None:
                agent.kill()
                agent.communicate()
    return done


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("patterns"))


@pytest.fixture(scope="module")
def single_node(dataset, tmp_path_factory):
    """The reference: one agent, two processes."""
    out = tmp_path_factory.mktemp("single") / "run"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "mobilenets", "train", "--data", str(dataset), "--out", str(out), *TRAIN],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=env())
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_two_nodes_compute_what_two_processes_on_one_node_do(dataset, single_node, tmp_path):
    out = tmp_path / "run"
    agents = two_nodes(dataset, out)
    assert all(a.returncode == 0 for a in agents), "\n".join(a.stderr[-2000:] for a in agents)
    assert sum(a.stdout.count('"run"') for a in agents) == 1  # one rank 0 over both nodes reports
    assert [r["epoch"] for r in train.read_metrics(out)] == [1, 2]
    assert rows_without_timing(out) == rows_without_timing(single_node)
    assert_same_state(out / "last.pt", single_node / "last.pt")


def test_elastic_restart_after_a_killed_rank_resumes_from_the_checkpoint_and_ends_equal(dataset, single_node,
                                                                                         tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1_IN_EPOCH_2)
    agents = two_nodes(dataset, out, script=script, max_restarts=1)
    logs = "\n".join(a.stderr for a in agents)
    assert all(a.returncode == 0 for a in agents), logs[-4000:]
    assert "SIGKILL" in logs or "Signals.SIGKILL" in logs or "exitcode: -9" in logs, logs[-4000:]  # it did die
    assert "135712" not in logs  # the fix is set: no warning
    # no epoch lost or repeated, and the numbers of an uninterrupted run
    assert [r["epoch"] for r in train.read_metrics(out)] == [1, 2]
    assert rows_without_timing(out) == rows_without_timing(single_node)
    assert_same_state(out / "last.pt", single_node / "last.pt")
    assert torch.equal(checkpoint.load(out / "last.pt")["rng"][1], checkpoint.load(single_node / "last.pt")["rng"][1])



def test_torchrun_restarts_on_the_shared_store_are_told_the_fix(tmp_path):
    # the variables restart_hazard reads are the ones this torchrun sets: a renamed one would silence the
    # warning.  The other side, no warning with the fix set, is the elastic test's.
    script = tmp_path / "environ.py"
    script.write_text("import json, os\nprint(json.dumps(dict(os.environ)))\n")
    environ = env()
    del environ[distributed.STALE_STORE_FIX.split("=")[0]]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                           "--max-restarts=1", str(script)], capture_output=True, text=True, timeout=120, env=environ)
    assert done.returncode == 0, done.stderr[-3000:]
    worker = json.loads(done.stdout.strip().splitlines()[-1])
    assert distributed.STALE_STORE_FIX in distributed.restart_hazard(worker)
    assert distributed.restart_hazard({**worker, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None
