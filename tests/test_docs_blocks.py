"""Every code block of the README and docs/ runs as a new user would run it, and prints what is shown.

The blocks run in document order in one folder, a user's folder: the real 1.0-224 ImageNet weights
(tests/real_data.py), the photos the packages ship, and the folders the text names as the user's own
(``my_images/``, ``flowers/``, ``holiday/``...) made from those photos. ``mobilenets``, ``python`` and
``pip`` are this checkout's. ``--weights imagenet`` is served from a local server holding files in the
released Keras layout (tests/weights_helpers.py): the suite cannot reach the model hubs.

A ``sh`` block runs as one bash script (``set -e``, ``pipefail``; ``\\`` continues a line, variables carry
over); a ``python`` block runs as one script. A bare fenced block right after a code block is its output:
the stdout of the block's last command (of the whole script) must match, ``...`` standing for any text. What does not run is in :data:`NOT_RUN` and what runs
with less work in :data:`REDUCED`, each with its reason: keep those two lists short.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import real_data
from weights_helpers import Server, write_keras2_h5

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
TIMEOUT_S = 900
MARK = "@@docs-test-next-command@@"

# Commands (a line's start) that are not run, and why.
NOT_RUN = {
    "make demo": "the main job (minutes); its training is docs/training.md's first block, run reduced",
    "make test": "the whole test suite, of which this is one file",
    "pip install": "it would change the environment the suite runs in",
    "python benchmarks/": "benchmarks take minutes to hours; their results are in benchmarks/results/",
    "OMP_WAIT_POLICY=PASSIVE flock": "a benchmark of the 16 models (an hour)",
    "flock ": "a benchmark (minutes)",
    "nice env OMP_NUM_THREADS=1": "a benchmark (minutes)",
    "mobilenets benchmark": "times every runtime at several batch sizes (minutes); test_benchmark.py runs it small",
    "mobilenets pick --latency-ms": "times the 16 published models (minutes); tests/test_pick.py runs it small",
    "mobilenets pick --runtime": "times 16 exported files in their runtime (minutes); tests/test_pick.py runs it small",
    "mobilenets train --recipe paper  --data /data/imagenet": "trains on ImageNet (days)",
    "mobilenets train --recipe modern --data /data/imagenet": "trains on ImageNet (days)",
    "torchrun": "trains on ImageNet with 8 GPUs",
    "mobilenets convert --from tf-slim": "the TF-slim release archive is on a model hub the suite cannot reach "
                                        "(tests/test_parity.py converts TF-slim checkpoints it writes)",
    "mobilenets convert --from timm": "timm's weights are on a model hub the suite cannot reach "
                                     "(tests/test_weights.py converts timm's own state dicts)",
}

# Text replaced before a block runs, and why: the same commands with less work.
REDUCED = {
    "--epochs 10": ("--epochs 1", "one epoch shows the command works; ten take minutes"),
    "--epochs 15": ("--epochs 1", "one epoch shows the command works; fifteen take minutes"),
    "epochs=15": ("epochs=1", "one epoch shows the call works; fifteen take minutes"),
    'precision="int8", calibration=batches': ('precision="int8", calibration=batches, backend="onnxruntime"',
                                              "auto builds and times every runtime, over 15 minutes on a busy "
                                              "2-core machine; one runtime shows the block works"),
}


@dataclass
class Block:
    document: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    output: str | None  # the bare block right after it, if any

    @property
    def id(self) -> str:
        return f"{self.document}:{self.line}"


def blocks(document: str) -> list[Block]:
    lines = (ROOT / document).read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        found.append((i + 1, m.group(1), "\n".join(lines[i + 1:end]), end))
        i = end + 1
    out = []
    for k, (line, lang, text, end) in enumerate(found):
        if not lang:
            continue  # an output, read with the block before it
        nxt = found[k + 1] if k + 1 < len(found) else None
        output = nxt[2] if nxt and not nxt[1] and nxt[0] == end + 2 else None
        out.append(Block(document, line, lang, text, output))
    return out


ALL = [b for d in DOCUMENTS for b in blocks(d)]


def commands(text: str) -> list[str]:
    """The logical lines of a shell block: continuations joined, blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def not_run(command: str) -> str | None:
    return next((why for start, why in NOT_RUN.items() if command.startswith(start)), None)


def reduced(text: str) -> str:
    for old, (new, _) in REDUCED.items():
        text = text.replace(old, new)
    return text


def matches(expected: str, printed: str) -> bool:
    """``printed`` is ``expected``, line ends stripped, with each ``...`` standing for any text."""
    def norm(s):
        return "\n".join(line.rstrip() for line in s.strip().splitlines())

    pattern = ".*?".join(re.escape(part) for part in norm(expected).split("..."))
    return re.fullmatch(pattern, norm(printed), re.DOTALL) is not None


# ---------------------------------------------------------------- the user's folder


def _script(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _photo_folder(folder: Path, photos, *, size: int | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in photos:
        image = Image.fromarray(rgb)
        if size:
            image = image.resize((size, size))
        image.save(folder / (Path(name).stem + ".jpg"), quality=92)


def _class_folders(root: Path, split: str, crops: np.ndarray, classes: list[str]) -> None:
    for k, crop in enumerate(crops):
        folder = root / split / classes[k % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).save(folder / f"{k}.jpg", quality=92)


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """(folder, environment): a user's folder with the files the documents name, and their shell's variables."""
    graph = real_data.real_graph_path()  # skips, with the reason, when the registry cannot be reached
    home = tmp_path_factory.mktemp("user")
    bin_dir = home / ".bin"
    bin_dir.mkdir()
    _script(bin_dir / "python", f'exec "{sys.executable}" "$@"')
    _script(bin_dir / "pip", f'exec "{sys.executable}" -m pip "$@"')
    _script(bin_dir / "mobilenets", f'exec "{sys.executable}" -m mobilenets "$@"')
    (home / "hubconf.py").symlink_to(ROOT / "hubconf.py")  # a clone's root, for torch.hub.load(".", ...)

    photos = real_data.photos()
    _photo_folder(home / "my_images", photos)
    _photo_folder(home / "holiday", photos[:4])
    Image.fromarray(dict(photos)["chelsea.png"]).save(home / "cat.jpg", quality=92)
    crops = real_data.heldout_crops(72, 256)  # train needs one batch (64) of images per process
    _class_folders(home / "flowers", "train", crops[:66], ["daisy", "rose", "tulip"])
    _class_folders(home / "flowers", "val", crops[66:], ["daisy", "rose", "tulip"])

    from mobilenets.weights import file
    from mobilenets.weights.keras import from_keras
    from mobilenets.weights.registry import get

    file.save(real_data.real_converted(), home / "mobilenet_v1_1.0_224.safetensors")
    served = home / ".served"
    served.mkdir()
    for alpha, resolution in ((1.0, 224), (0.5, 160)):
        write_keras2_h5(served / get(alpha, resolution).keras_file, alpha, seed=3)
    shutil.copy(served / get(1.0, 224).keras_file, home / get(1.0, 224).keras_file)  # docs/weights.md converts it
    for alpha, resolution, name in ((1.0, 224, "mobilenet_1_0_224"), (0.5, 160, "mobilenet_0_5_160")):
        # converted Keras files the docs load (in the released layout, not the released values)
        file.save(from_keras(served / get(alpha, resolution).keras_file, resolution=resolution),
                  home / f"{name}.safetensors")
    server = Server(served)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", MOBILENETS_WEIGHTS_URL=server.url,
               MOBILENETS_CACHE=str(home / ".cache"), MPLBACKEND="Agg")
    assert graph.is_file()
    yield home, env
    server.close()


def _run(args, home, env, what):
    done = subprocess.run(args, cwd=home, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{what} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.parametrize("block", ALL, ids=[b.id for b in ALL])
def test_block_runs_and_prints_what_is_shown(block, user):
    home, env = user
    if block.lang in ("sh", "bash"):
        run = [c for c in commands(reduced(block.text)) if not not_run(c)]
        if not run:
            pytest.skip(f"{block.id}: " + "; ".join(sorted({not_run(c) for c in commands(block.text)})))
        # one script, so that variables carry over; a marker line before each command finds the last one's output
        script = "set -e -o pipefail\n" + "".join(f"echo {MARK}\n{c}\n" for c in run)
        printed = _run(["bash", "-c", script], home, env, block.id).rsplit(MARK + "\n", 1)[-1]
    elif block.lang == "python":
        script = home / ".block.py"
        script.write_text(reduced(block.text))
        printed = _run([sys.executable, str(script)], home, env, block.id)
    else:
        pytest.fail(f"{block.id}: a ```{block.lang} block; the suite runs sh and python blocks (a bare ``` block "
                    f"right after one is its output)")
    if block.output is not None:
        assert matches(block.output, printed), f"{block.id} printed:\n{printed}\nnot what the document shows:\n" \
                                               f"{block.output}"


def test_the_lists_of_blocks_not_run_name_real_commands():
    """A stale entry would hide nothing but still read as if it did."""
    every = [c for b in ALL if b.lang in ("sh", "bash") for c in commands(b.text)]
    texts = "\n".join(b.text for b in ALL)
    for start in NOT_RUN:
        assert any(c.startswith(start) for c in every), start
    for old in REDUCED:
        assert old in texts, old


def test_an_output_block_is_compared_with_ellipsis_as_any_text():
    assert matches("a\n  1   457   37.48%  bow...", "a\n  1   457   37.48%  bow tie  \n")
    assert not matches("a\n  1   457   37.48%  bow...", "a\n  1   457   37.49%  bow tie")
    assert not matches("True", "True\nFalse")
