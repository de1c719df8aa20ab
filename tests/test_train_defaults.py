"""Threads and loader processes a training run chooses, the flags that override them, and the loader's own rate
in the metrics and the progress line.

The expected choices are the settings that measured fastest on a 2-core machine
(benchmarks/results/train_input.md): in-memory digits on one thread and no
worker, a small model on JPEGs with workers, a large model on every core.
"""

from __future__ import annotations

import io
import time

import pytest
import torch

from imagefolders import make_dataset
from mobilenets import cores, data, train
from mobilenets.cost import cost
from mobilenets.train import resources
from mobilenets.train.console import Progress

DIGITS_DEMO = cost(0.5, 48, num_classes=10).mult_adds  # make demo's model
SMALL = cost(0.25, 128, num_classes=1000).mult_adds
LARGE = cost(1.0, 224, num_classes=1000).mult_adds


def choose(**kw):
    options = dict(cores=2, in_memory=False, batch_size=32, loader_seconds=3e-3, passive=True)
    options.update(kw)
    r = resources.choose(**options)
    return r.threads, r.num_workers


def test_in_memory_digits_small_model_one_thread_no_worker():
    assert choose(in_memory=True, mult_adds=DIGITS_DEMO, loader_seconds=1e-4) == (1, 0)
    # in memory means no worker even for a model large enough for two threads
    assert choose(in_memory=True, mult_adds=LARGE, batch_size=16, loader_seconds=1e-4) == (2, 0)


def test_jpegs_get_workers_in_proportion_to_the_loading_share():
    # 500x375 JPEGs (~3 ms an image) for MobileNet 0.25-128 (~3 ms of training an image): half the work
    assert choose(mult_adds=SMALL, loader_seconds=3e-3) == (2, 1)
    # phone photos (~30 ms an image even at 1/8 scale): the loader needs every core
    assert choose(mult_adds=SMALL, loader_seconds=30e-3) == (2, 2)
    # a large model hardly waits for 500x375 JPEGs: one worker, every core for the model
    assert choose(mult_adds=LARGE, batch_size=16, loader_seconds=3e-3) == (2, 1)
    # an epoch with little to load (510 such JPEGs: 1.5 s) is faster without the workers' start-up
    assert choose(mult_adds=SMALL, loader_seconds=3e-3, images=510) == (2, 0)
    assert choose(mult_adds=SMALL, loader_seconds=3e-3, images=5000) == (2, 1)
    # one core: nothing to overlap on
    assert choose(cores=1, mult_adds=SMALL, loader_seconds=30e-3) == (1, 0)
    assert choose(cores=8, mult_adds=SMALL, loader_seconds=30e-3)[1] == 7  # 90% of 8 cores
    assert choose(cores=64, mult_adds=0, loader_seconds=30e-3)[1] == resources.MAX_WORKERS  # a GPU run


def test_a_second_thread_only_for_steps_large_enough_to_split():
    per_step = resources.MIN_MULT_ADDS_PER_THREAD
    assert choose(mult_adds=int(per_step // 32) - 1, in_memory=True) == (1, 0)
    assert choose(mult_adds=int(per_step // 32) + 1, in_memory=True) == (2, 0)
    assert choose(mult_adds=LARGE, batch_size=2, cores=16, in_memory=True) == (1 + int(2 * LARGE // per_step), 0)


def test_without_passive_openmp_threads_never_share_a_core_with_a_worker():
    assert choose(mult_adds=LARGE, batch_size=16, loader_seconds=3e-3, passive=False) == (1, 1)
    assert choose(mult_adds=LARGE, batch_size=16, loader_seconds=3e-3, passive=False, cores=8) == (7, 1)
    assert choose(mult_adds=LARGE, in_memory=True, passive=False) == (2, 0)


def test_given_threads_and_workers_win():
    assert choose(mult_adds=SMALL, threads=3, num_workers=5) == (3, 5)
    assert choose(mult_adds=SMALL, loader_seconds=30e-3, num_workers=0) == (2, 0)
    assert choose(in_memory=True, mult_adds=DIGITS_DEMO, threads=2) == (2, 0)
    assert "given" in resources.choose(cores=2, in_memory=True, mult_adds=1, batch_size=2, loader_seconds=0,
                                       passive=True, threads=1, num_workers=0).reason


def test_no_thread_for_a_core_other_work_keeps_busy():
    # one process spinning on one of 2 cores: 1 thread trained 1.4x faster than 2 (train_input.md)
    assert choose(mult_adds=LARGE, in_memory=True, busy=1.0) == (1, 0)
    assert choose(mult_adds=LARGE, in_memory=True, busy=0.3) == (2, 0)
    assert choose(mult_adds=LARGE, in_memory=True, cores=8, busy=2.8) == (5, 0)
    assert choose(mult_adds=LARGE, in_memory=True, busy=2.0) == (1, 0)  # never none
    assert choose(mult_adds=LARGE, in_memory=True, busy=1.0, threads=2) == (2, 0)  # given wins


def test_busy_cores_sees_another_process_spinning():
    """Measured from /proc/stat over this process's cores while a child spins on one of them."""
    import os
    import subprocess
    import sys

    if not os.path.exists("/proc/stat"):
        pytest.skip("/proc/stat is Linux's")
    core = min(os.sched_getaffinity(0))
    spin = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])
    try:
        time.sleep(0.5)  # started and spinning
        assert cores.busy_cores(0.5) >= 0.8
    finally:
        spin.kill()
        spin.wait()


def test_cores_follow_the_affinity_mask_and_are_shared_by_local_ranks(monkeypatch):
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resources.cores() == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun --nproc_per_node=2
    assert resources.cores() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert resources.cores() == 1


def test_omp_passive_reads_the_environment(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert cores.omp_passive()
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert not cores.omp_passive()
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert not cores.omp_passive()


def test_probe_measures_the_loaders_cpu_time_per_image(tmp_path):
    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, key):
            end = time.thread_time() + 0.02  # 20 ms of CPU per image
            while time.thread_time() < end:
                pass
            return torch.zeros(1), 0

    assert 0.02 <= resources.probe_loader(Slow()) < 0.04


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("patterns"), train_per_class=16, val_per_class=4)


def tiny(out, **overrides):
    options = dict(alpha=0.25, resolution=32, epochs=1, batch_size=8, progress=False, plot=False, out=str(out))
    options.update(overrides)
    return train.make_config("paper", **options)


def test_a_run_records_its_choice_and_the_loaders_rate(tmp_path, folder, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    probed = []

    def probe(dataset):
        probed.append(len(dataset))
        return 1e-3  # fixed, so the expected choice does not depend on this machine's speed

    monkeypatch.setattr(resources, "probe_loader", probe)
    threads = torch.get_num_threads()
    row = train.train(tiny(tmp_path / "a", data=str(folder)))
    assert torch.get_num_threads() == threads  # the caller's setting comes back
    assert probed == [48]  # the training set was probed
    expected = resources.choose(cores=resources.cores(), in_memory=False,
                                mult_adds=cost(0.25, 32, num_classes=3).mult_adds, batch_size=8,
                                loader_seconds=1e-3, passive=True, images=48)
    assert (row["threads"], row["num_workers"]) == (expected.threads, expected.num_workers)
    dataset = data.ImageFolder(folder / "train", data.TrainTransform(32, data.default_min_scale(0.25)))
    # the loader's own rate, against a CPU-time measurement of the same images made here
    start = time.process_time()
    for i in range(len(dataset)):
        dataset[(i, i)]
    per_core = len(dataset) / (time.process_time() - start)
    assert per_core / 4 < row["loader_images_per_core_s"] < per_core * 4
    assert 0 <= row["input_wait_fraction"] < 1
    assert row["model_images_per_s"] >= row["images_per_s"]


def test_given_flags_reach_the_run_and_digits_use_no_worker(tmp_path, folder):
    row = train.train(tiny(tmp_path / "b", data=str(folder), threads=1, num_workers=1))
    assert (row["threads"], row["num_workers"]) == (1, 1)
    assert row["loader_images_per_core_s"] > 0  # measured in the worker process and sent with each batch
    row = train.train(tiny(tmp_path / "c", data=None, batch_size=64))
    assert row["num_workers"] == 0


def test_progress_line_shows_the_model_and_the_loader():
    stream = io.StringIO()
    progress = Progress(True, 8, stream=stream)
    meter = train.loop.InputMeter(2)
    with meter.waiting():
        time.sleep(0.05)
    meter.loaded(data.Batch(torch.zeros(8, 3, 4, 4), torch.zeros(8), [], seconds=0.04))
    progress.update(1, 1, 1, 2, 0.5, 40.0, meter.describe(2 * meter.wait))
    line = stream.getvalue()
    assert "40.0 img/s" in line and "loader 200 img/s per core x 2" in line, line  # 8 images in 0.04 CPU s
    assert "waited 50%" in line, line


def test_a_long_step_keeps_the_progress_line_moving_where_asked(monkeypatch):
    """Epochs of few long steps (issue 22 saw 34 s between lines): a step running past LONG_STEP is shown
    running; a log that did not ask for progress gets no such line."""
    from mobilenets.train import console

    monkeypatch.setattr(console, "LONG_STEP", 0.2)
    monkeypatch.setattr(console.progress, "LINE_EVERY", 0.05)
    for asked in ("1", "0"):
        monkeypatch.setenv("MOBILENETS_PROGRESS", asked)
        stream = io.StringIO()
        shown = Progress(True, 8, stream=stream)
        shown.start()
        shown.update(1, 3, 1, 2, 0.5, 40.0)
        time.sleep(0.6)  # the second step runs long
        shown.close()
        lines = stream.getvalue().splitlines()
        running = [line for line in lines if "next step running" in line]
        assert bool(running) == (asked == "1"), lines
        assert all(line.startswith("epoch 1/3 [") for line in running)
