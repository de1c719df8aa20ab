"""Plant known bugs one at a time in a scratch copy and check that the tests meant to catch each one fail.

Run from the repository root, before a release (about 10-15 minutes on a 2-core machine)::

    python tools/mutation_check.py                 # every mutant, baseline first
    python tools/mutation_check.py -k ema -k ddp   # only mutants whose name contains one of these
    python tools/mutation_check.py --list          # the list, nothing run
    python tools/mutation_check.py --jobs 2        # two mutants at a time (each in its own copy)

It copies ``src/``, ``tests/``, ``docs/`` and the top-level files to a scratch
folder, first runs every selected test unmutated (a test that already fails
would "catch" every bug), then for each mutant writes its replacement over the
exact original text, runs the tests it names with ``python -m pytest -x -q``
(``PYTHONPATH`` pointing at the scratch ``src``), restores the file, and
prints caught / survived / timeout per mutant.  Exit status 1 if any mutant
survives or times out (a timeout proves nothing), or the baseline fails.

Every bug found in the code belongs on this list: add the planted form of it
with the narrowest tests that catch it.  ``tests/test_mutation_list.py`` checks
that every original text still occurs exactly once, so the list cannot rot.

This list is a regression list, not the measure of the suite: it holds the bugs
someone thought of, and the suite caught all 63 of them while 12 of 14 bugs
planted by someone who had not seen it survived.  The measure is the score of
mechanically generated mutants on a seeded random sample per core module,
``tools/mutation_sample.py`` (cosmic-ray), recorded in
``benchmarks/results/mutation_sample.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("src", "tests", "docs", "pyproject.toml", "hubconf.py", "README.md")


@dataclass(frozen=True)
class Edit:
    file: str  # relative to src/mobilenets
    original: str  # must occur exactly once in the file
    replacement: str


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # pytest arguments: node ids, or files with -k


def m(name: str, area: str, file: str, original: str, replacement: str, *tests: str) -> Mutant:
    return Mutant(name, area, (Edit(file, original, replacement),), tests)


T_MODEL = "tests/test_model.py"
T_COST = "tests/test_cost.py"
T_TRAIN = "tests/test_train.py"
T_DEPLOY = "tests/test_deploy.py"

MUTANTS: tuple[Mutant, ...] = (
    # ------------------------------------------------------------ model, architecture, cost
    m("width round() instead of int()", "architecture", "architecture.py",
      "return max(int(channels * alpha), min_depth)", "return max(round(channels * alpha), min_depth)",
      f"{T_MODEL}::test_width_rule_is_tf_slims_for_any_alpha"),
    m("width without the min_depth clamp", "architecture", "architecture.py",
      "return max(int(channels * alpha), min_depth)", "return int(channels * alpha)",
      f"{T_MODEL}::test_width_rule_and_min_depth"),
    m("Table 1 row 3 stride 2 instead of 1", "architecture", "architecture.py",
      "DepthSepConv(kernel=3, stride=1, depth=128)", "DepthSepConv(kernel=3, stride=2, depth=128)",
      f"{T_COST}::test_spec_numbers_exact"),
    m("shallow variant removes the wrong rows", "architecture", "architecture.py",
      "SHALLOW_REMOVED = (7, 8, 9, 10, 11)", "SHALLOW_REMOVED = (6, 7, 8, 9, 10)",
      f"{T_COST}::test_spec_numbers_exact"),
    m("output_stride: later strides not turned into dilation", "architecture", "architecture.py",
      "stride, dilation = 1, rate", "stride, dilation = 1, 1",
      f"{T_MODEL}::test_output_stride_by_dilation"),
    m("classifier bias not counted", "cost", "cost.py",
      "params=weights + (layer.out_channels if is_fc else 0)", "params=weights",
      f"{T_COST}::test_spec_numbers_exact"),
    m("BatchNorm parameters counted twice", "cost", "cost.py",
      "bn_params=0 if is_fc else 2 * layer.out_channels", "bn_params=0 if is_fc else 4 * layer.out_channels",
      f"{T_COST}::test_spec_numbers_exact"),
    m("BN epsilon default 1e-5 instead of TF's 1e-3", "model", "model.py",
      "bn_eps: float = 1e-3", "bn_eps: float = 1e-5",
      f"{T_MODEL}::test_options_reach_the_layers"),
    m("TF-SAME pads top/left instead of bottom/right", "model", "model.py",
      "return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])",
      "return F.pad(x, [pw - pw // 2, pw // 2, ph - ph // 2, ph // 2])",
      f"{T_MODEL}::test_tf_same_padding_matches_timm_conv2d_same"),
    m("initialisation stddev 0.9 instead of 0.09", "model", "model.py",
      "nn.init.trunc_normal_(m.weight, std=0.09, a=-0.18, b=0.18)",
      "nn.init.trunc_normal_(m.weight, std=0.9, a=-1.8, b=1.8)",
      f"{T_MODEL}::test_truncated_normal_init"),
    # ------------------------------------------------------------ weights
    m("TF conv kernels transposed spatially", "weights/tf_layers", "weights/tf_layers.py",
      "k.permute(3, 2, 0, 1)", "k.permute(3, 2, 1, 0)",
      "tests/test_weights.py::test_keras_weights_land_where_the_layout_says"),
    m("TF-slim head drops the last class instead of background", "weights/tf_slim", "weights/tf_slim.py",
      "w, b = w[..., 1:], b[1:]", "w, b = w[..., :-1], b[:-1]",
      "tests/test_tf_frozen.py::test_crafted_graph_alpha_resolution_epsilon_from_the_graph"),
    m("frozen graph's BN epsilon ignored", "weights/tf_frozen", "weights/tf_frozen.py",
      "bn_eps=bn_epsilon(graph, prefix))", "bn_eps=1e-3)",
      "tests/test_tf_frozen.py::test_crafted_graph_alpha_resolution_epsilon_from_the_graph"),
    m("Keras resolution not read from the file name", "weights/keras", "weights/keras.py",
      r'resolution = resolution or resolution_from_name(path, r"mobilenet_\d_\d_(\d+)_tf") or input_size',
      "resolution = resolution or input_size",
      "tests/test_weights.py::test_keras_conversion_infers_alpha_resolution_classes_and_records_metadata"),
    m("safetensors sha256 never compared", "weights/file", "weights/file.py",
      "    if digest != recorded:", "    if False:",
      "tests/test_weights.py::test_corrupted_converted_file_is_detected"),
    m("pinned download sha256 never compared", "weights/download", "weights/download.py",
      "        if digest != pinned:", "        if False:",
      "tests/test_weights.py::test_a_pinned_sha256_is_checked_and_nothing_is_recorded"),
    m("first-use sha256 record never compared", "weights/download", "weights/download.py",
      "        elif known[path.name] != digest:", "        elif False:",
      "tests/test_weights.py::test_pretrained_detects_a_changed_download"),
    m("download size cap not enforced while streaming", "weights/download", "weights/download.py",
      "                if done > max_bytes:", "                if False:",
      "tests/test_weights_hostile.py::test_downloads_over_the_size_cap_are_refused"),
    # ------------------------------------------------------------ train
    m("RMSprop eps outside the square root", "train/optim", "train/optim.py",
      'denominators = torch._foreach_add(square_avgs, group["eps"])\n            torch._foreach_sqrt_(denominators)',
      'denominators = torch._foreach_sqrt(square_avgs)\n            torch._foreach_add_(denominators, group["eps"])',
      f"{T_TRAIN}::test_rmsprop_tf_is_tf_update_formula"),
    m("RMSprop mean square starts at 0 (PyTorch's) not 1 (TF's)", "train/optim", "train/optim.py",
      'self.state[p]["square_avg"] = torch.ones_like(', 'self.state[p]["square_avg"] = torch.zeros_like(',
      f"{T_TRAIN}::test_rmsprop_tf_is_tf_update_formula"),
    m("weight decay on depthwise filters", "train/optim", "train/optim.py",
      "isinstance(module, (nn.Conv2d, nn.Linear)) and not is_depthwise",
      "isinstance(module, (nn.Conv2d, nn.Linear))",
      f"{T_TRAIN}::test_no_weight_decay_on_depthwise_bn_or_bias"),
    m("learning-rate decay not a staircase", "train/optim", "train/optim.py",
      "c.lr_gamma ** math.floor((epoch - warmup) / c.lr_step_size)",
      "c.lr_gamma ** ((epoch - warmup) / c.lr_step_size)",
      f"{T_TRAIN}::test_paper_schedule_is_staircase_0_94_every_2_5_epochs"),
    m("EMA warm-up removed (always decay)", "train/EMA", "train/optim.py",
      "d = min(self.decay, (1 + self.updates) / (10 + self.updates))", "d = self.decay",
      f"{T_TRAIN}::test_ema_follows_tf_formula_with_its_warm_up_on_a_toy_module"),
    m("EMA never updates during training", "train/EMA", "train/loop.py",
      "                s.ema.update(s.model)", "                pass",
      f"{T_TRAIN}::test_ema_of_a_training_run_is_the_formula_over_the_weights_it_saw"),
    m("DDP wrapper removed (ranks never sync gradients)", "train/loop", "train/loop.py",
      "    if dist.enabled:\n        train_model = nn.parallel.DistributedDataParallel(",
      "    if False:\n        train_model = nn.parallel.DistributedDataParallel(",
      f"{T_TRAIN}::test_ddp_ranks_end_bit_equal_and_match_one_process_on_the_global_batch"),
    Mutant("bf16 autocast disabled and label smoothing forced to 0", "train/loop", (
        Edit("train/loop.py", "dtype=torch.bfloat16, enabled=c.amp)", "dtype=torch.bfloat16, enabled=False)"),
        Edit("train/loop.py", "nn.CrossEntropyLoss(label_smoothing=c.label_smoothing)",
             "nn.CrossEntropyLoss(label_smoothing=0.0)"),
    ), (f"{T_TRAIN}::test_label_smoothing_changes_the_loss_by_its_formula", f"{T_TRAIN}::test_amp_and_channels_last_run_on_cpu")),
    m("bf16 autocast disabled", "train/loop", "train/loop.py",
      "dtype=torch.bfloat16, enabled=c.amp)", "dtype=torch.bfloat16, enabled=False)",
      f"{T_TRAIN}::test_amp_and_channels_last_run_on_cpu"),
    m("label smoothing forced to 0", "train/loop", "train/loop.py",
      "nn.CrossEntropyLoss(label_smoothing=c.label_smoothing)", "nn.CrossEntropyLoss(label_smoothing=0.0)",
      f"{T_TRAIN}::test_label_smoothing_changes_the_loss_by_its_formula"),
    m("sync_bn accepted on CPU", "train/config", "train/__init__.py",
      'if config.sync_bn and device.type == "cpu":', "if False:",
      f"{T_TRAIN}::test_sync_bn_is_refused_on_cpu_before_any_work"),
    m("an interrupted train exits 0, not 128 + the signal", "train/cli", "cli.py",
      "        return 128 + e.signum", "        return 0",
      f"{T_TRAIN}::test_ctrl_c_saves_and_exits_130"),
    m("resume does not restore the RNG", "train/checkpoint", "train/loop.py",
      "        torch.set_rng_state(rng[dist.rank])", "        pass",
      f"{T_TRAIN}::test_sigterm_saves_mid_epoch_exits_cleanly_and_resumes_exactly"),
    m("checkpoint sha256 not checked on load", "checkpoint", "checkpoint.py",
      '        if actual != obj["sha256"]:', "        if False:",
      "tests/test_checkpoint.py::test_sha256_covers_the_content_and_flipped_bytes_are_refused_naming_the_file"),
    # ------------------------------------------------------------ deploy
    m("BN folding drops beta", "folding", "folding.py",
      "fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias.detach())",
      "fused.bias.copy_((bias - bn.running_mean) * scale)",
      f"{T_DEPLOY}::test_fold_batchnorm_gives_the_eval_logits"),
    m("BN folding drops epsilon", "folding", "folding.py",
      "torch.sqrt(bn.running_var + bn.eps)", "torch.sqrt(bn.running_var)",
      f"{T_DEPLOY}::test_fold_batchnorm_gives_the_eval_logits"),
    m("OpenVINO int8 never quantized", "deploy/openvino", "deploy/openvino.py",
      "            model = ov.Core().read_model(str(path))",
      "            model = ov.convert_model(folded, example_input=example, input=[ov.PartialShape(shape)])",
      f"{T_DEPLOY}::test_openvino_int8_runs_int8_convolutions"),
    m("ONNX Runtime int8 never quantized", "deploy/onnxruntime", "deploy/onnxruntime.py",
      "return to_qdq_onnx(ready, path, resolution=resolution)",
      "return export_onnx(folded, path, resolution=resolution, batch_size=batch_size)",
      f"{T_DEPLOY}::test_onnx_int8_has_qdq_around_every_convolution"),
    m("PT2E int8 never converted", "deploy/pytorch", "deploy/pytorch.py",
      "return convert_pt2e(prepared)", "return exported",
      f"{T_DEPLOY}::test_pt2e_int8_quantizes_every_convolution"),
    m("ExecuTorch runner keeps the method but not its program", "deploy/executorch", "deploy/executorch.py",
      '            self.program = Runtime.get().load_program(data)\n            self.method = self.program.load_method("forward")',
      '            self.method = Runtime.get().load_program(data).load_method("forward")',
      "tests/test_executorch.py::test_a_runner_outlives_the_bytes_it_was_given"),
    m("ExecuTorch int8 ranges one layer late", "deploy/executorch", "deploy/executorch.py",
      'return f"features.{convs.index(node.args[0])}"', 'return f"features.{max(convs.index(node.args[0]) - 1, 0)}"',
      "tests/test_executorch.py::test_small_model_int8_export_command"),
    m("ExecuTorch accepts a convolution outside XNNPACK", "deploy/executorch", "deploy/executorch.py",
      "    if outside or len(expected) != weighted:", "    if False:",
      "tests/test_executorch.py::test_a_convolution_outside_xnnpack_is_refused"),
    m("mean KL computed the wrong way round", "deploy/fidelity", "deploy/fidelity.py",
      "(p_log.exp() * (p_log - q_log))", "(q_log.exp() * (q_log - p_log))",
      f"{T_DEPLOY}::test_parity_mean_kl_is_kl_of_the_softmaxes_in_nats"),
    m("train --qat ignores the labels", "quantize/qat", "quantize/qat.py",
      "            loss = loss + F.nll_loss(out, labels[idx])", "            pass",
      "tests/test_train_qat.py::test_labels_lift_an_undertrained_models_int8_accuracy"),
    m("train --qat keeps fine-tuning that lowers int8 accuracy", "train/qat", "train/qat.py",
      "        kept = qat_top1 >= ptq_top1", "        kept = True",
      "tests/test_train_qat.py::test_fine_tuning_that_lowers_int8_accuracy_is_not_kept"),
    m("train --qat never writes int8.safetensors", "train/qat", "train/qat.py",
      "    path = quantize.save(ready, model, Path(s.out) / INT8)", "    path = Path(s.out) / INT8",
      "tests/test_train_qat.py::test_train_qat_writes_int8_weights_whose_accuracy_onnxruntime_confirms"),
    # ------------------------------------------------------------ data, images, pipeline, predict
    m("Inception normalisation mean 0 instead of 0.5", "images", "images.py",
      "INCEPTION = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))",
      "INCEPTION = Normalization((0.0, 0.0, 0.0), (0.5, 0.5, 0.5))",
      "tests/test_images.py::test_eval_transform_resizes_crops_and_scales_to_minus_one_one"),
    m("default normalisation mean 0 instead of 0.5", "images", "images.py",
      "mean: tuple[float, float, float] = (0.5, 0.5, 0.5)", "mean: tuple[float, float, float] = (0.0, 0.0, 0.0)",
      "tests/test_predict.py::test_a_model_without_metadata_uses_224_px_and_x_over_127_5_minus_1"),
    m("crop at the top-left corner, not the centre", "images", "images.py",
      "return new_w, new_h, int(round((new_w - resolution) / 2.0)), int(round((new_h - resolution) / 2.0))",
      "return new_w, new_h, 0, 0",
      "tests/test_images.py::test_eval_transform_centre_crop_keeps_the_centre"),
    m("EXIF rotation ignored", "images", "images.py",
      "ImageOps.exif_transpose(im, in_place=True)", "im.getexif()",
      "tests/test_images.py::test_exif_rotation_is_applied"),
    m("EXIF rotation ignored by the fast JPEG path", "images", "images.py",
      "return _oriented(torch.from_numpy(hwc), im.getexif().get(EXIF_ORIENTATION))",
      "return _oriented(torch.from_numpy(hwc), 1)",
      "tests/test_images.py::test_load_pixels_are_load_rgbs_pixels_bit_for_bit"),
    m("pipeline leaves glibc's mmap threshold dynamic", "pipeline", "pipeline.py",
      "    bound_heap()\n", "    pass\n",
      "tests/test_predict.py::test_large_blocks_are_mapped_whole_once_the_pipeline_runs"),
    m("OpenVINO compiles on whatever signal stack it finds", "deploy/openvino", "deploy/openvino.py",
      "    sigaltstack(ctypes.byref(_StackT(ctypes.cast(buffer, ctypes.c_void_p), 0, SIGNAL_STACK_BYTES)), None)",
      "    pass",
      f"{T_DEPLOY}::test_openvino_models_destroyed_out_of_order_leave_signals_deliverable"),
    m("the int8 preparation's cache key ignores the calibration images", "deploy", "deploy/prepare.py",
      "        h.update(b.detach().float().contiguous().cpu().numpy().tobytes())", "        pass",
      f"{T_DEPLOY}::test_int8_preparation_is_cached_per_weights_calibration_and_code"),
    m("auto keeps a choice measured on a busy machine for good", "deploy", "deploy/auto.py",
      "        cached = None\n", "        pass\n",
      f"{T_DEPLOY}::test_auto_measures_again_once_the_machine_is_quiet"),
    m("ExecuTorch int8: pads back in float between the convolutions", "deploy/executorch", "deploy/executorch.py",
      "    _quantize_before_pads(prepared)", "    pass",
      "tests/test_executorch.py::test_tf_padding_stays_int8_inside_the_convolutions"),
    m("ExecuTorch files without their constant methods", "deploy/executorch", "deploy/executorch.py",
      "constant_methods=constants).to_executorch().buffer", "constant_methods=None).to_executorch().buffer",
      "tests/test_executorch.py::test_the_file_tells_an_app_its_input_and_labels"),
    m("ONNX Runtime spins although the process asked for passive waiting", "deploy/onnxruntime",
      "deploy/onnxruntime.py",
      'options.add_session_config_entry("session.intra_op.allow_spinning", "0")', "pass",
      "tests/test_deploy.py::test_onnxruntime_threads_sleep_when_the_process_asks_for_passive_waiting"),
    m("training crop resized without PIL's antialiasing filter", "data", "data.py",
      'mode="bilinear", antialias=True,', 'mode="bilinear", antialias=False,',
      "tests/test_data.py::test_training_crop_is_pils_crop_and_bilinear_resize_to_within_one_grey_level"),
    m("predict's reduced-scale decoding stops at twice the resize size, not the resize size", "images", "images.py",
      "    return resize_size(resolution)", "    return 2 * resize_size(resolution)",
      "tests/test_predict.py::test_large_jpegs_decode_at_the_coarsest_dct_scale_keeping_the_resize_size_unless_exact"),
    m("epoch order ignores the epoch", "data", "data.py",
      "g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)",
      "g = torch.Generator().manual_seed(self.seed * 1_000_003)",
      "tests/test_data.py::test_epoch_sampler_order_depends_on_seed_and_epoch_only"),
    m("pipeline ignores the weights' normalisation", "pipeline", "pipeline.py",
      "x = None if batch.x is None else images.to_tensor(batch.x, normalization)",
      "x = None if batch.x is None else images.to_tensor(batch.x)",
      "tests/test_predict.py::test_checkpoint_metadata_drives_resolution_normalization_and_labels"),
    m("pipeline shuffles the images", "pipeline", "pipeline.py",
      "batch_size=batch_size, shuffle=False,", "batch_size=batch_size, shuffle=True,",
      "tests/test_predict.py::test_workers_and_batching_equal_the_per_image_path"),
    m("predict ranks the least probable classes first", "predict", "predict.py",
      "values, indices = probabilities.topk(topk, dim=1)",
      "values, indices = probabilities.topk(topk, dim=1, largest=False)",
      "tests/test_predict.py::test_folder_in_every_mode_with_preprocessing_from_metadata"),
    m("decode_predictions reports logits, not probabilities", "predict", "predict.py",
      "torch.softmax(logits.float(), dim=1).topk(k, dim=1)", "logits.float().topk(k, dim=1)",
      "tests/test_predict.py::test_decode_predictions_matches_softmax_topk"),
)


def check_list(src: Path = ROOT / "src" / "mobilenets") -> list[str]:
    """Problems with the list: an original that no longer occurs exactly once, a mutant without tests."""
    problems = []
    names = [mu.name for mu in MUTANTS]
    problems += [f"duplicate mutant name {n!r}" for n in sorted({n for n in names if names.count(n) > 1})]
    for mu in MUTANTS:
        if not mu.tests:
            problems.append(f"{mu.name}: no tests named")
        for e in mu.edits:
            path = src / e.file
            if not path.is_file():
                problems.append(f"{mu.name}: {e.file} does not exist")
                continue
            count = path.read_text().count(e.original)
            if count != 1:
                problems.append(f"{mu.name}: original text occurs {count} times in {e.file}: {e.original!r}")
            if e.original == e.replacement:
                problems.append(f"{mu.name}: replacement equals the original")
    return problems


def scratch_copy(into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=ignore)
        elif source.is_file():
            shutil.copy2(source, into / name)
    return into


def run_pytest(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
    env = {**os.environ, "PYTHONPATH": str(copy / "src"), "PYTHONDONTWRITEBYTECODE": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    t0 = time.monotonic()
    # a new session so a timeout can end the tests' own subprocesses (DDP ranks) too
    proc = subprocess.Popen(command, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        return "timeout", time.monotonic() - t0, out
    elapsed = time.monotonic() - t0
    if proc.returncode == 0:
        return "passed", elapsed, out
    if proc.returncode == 1:
        return "failed", elapsed, out
    if proc.returncode == -9:
        return "error (killed by SIGKILL: out of memory?)", elapsed, out
    return f"error (pytest exit {proc.returncode})", elapsed, out


def restore(saved: dict[Path, str]) -> None:
    for path, text in saved.items():
        path.write_text(text)


def apply(copy: Path, mutant: Mutant) -> dict[Path, str]:
    """Plant every edit of ``mutant`` in ``copy``; returns the original texts to restore."""
    saved: dict[Path, str] = {}
    try:
        for e in mutant.edits:
            path = copy / "src" / "mobilenets" / e.file
            current = path.read_text()
            saved.setdefault(path, current)
            if current.count(e.original) != 1:
                raise SystemExit(f"{mutant.name}: original text not found exactly once in {e.file}; "
                                 f"run tests/test_mutation_list.py")
            path.write_text(current.replace(e.original, e.replacement))
    except BaseException:
        restore(saved)
        raise
    return saved


def run_mutant(copy: Path, mutant: Mutant, timeout: float) -> tuple[str, float, str]:
    saved = apply(copy, mutant)
    try:
        outcome, elapsed, out = run_pytest(copy, mutant.tests, timeout)
    finally:
        restore(saved)
    verdict = {"failed": "caught", "passed": "SURVIVED", "timeout": "TIMEOUT"}.get(outcome, f"ERROR: {outcome}")
    return verdict, elapsed, out


def baseline_selections(mutants) -> list[tuple[str, ...]]:
    """The mutants' test selections grouped by test file; a selection with -k runs on its own."""
    by_file: dict[str, list[str]] = {}
    alone = []
    for mu in mutants:
        if "-k" in mu.tests:
            alone.append(mu.tests)
            continue
        for t in mu.tests:
            by_file.setdefault(t.split("::")[0], [])
            if t not in by_file[t.split("::")[0]]:
                by_file[t.split("::")[0]].append(t)
    return [tuple(v) for v in by_file.values()] + list(dict.fromkeys(alone))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", action="append", default=[], help="run only mutants whose name contains this (repeatable)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per mutant (default 300)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once, each in its own copy (default 1)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    parser.add_argument("--list", action="store_true", help="print the mutants and their tests, run nothing")
    parser.add_argument("--verbose", action="store_true", help="print pytest's output for every mutant")
    args = parser.parse_args(argv)

    problems = check_list()
    if problems:
        print("the mutant list is out of date:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    chosen = [mu for mu in MUTANTS if not args.k or any(k.lower() in mu.name.lower() for k in args.k)]
    if args.list:
        for mu in chosen:
            print(f"{mu.area:20} {mu.name}\n{'':20}   {' '.join(mu.tests)}")
        return 0
    if not chosen:
        print("no mutant matches", file=sys.stderr)
        return 2

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mobilenets-mutants-") as tmp:
        copies = [scratch_copy(Path(tmp) / f"copy{i}") for i in range(max(1, args.jobs))]
        if not args.no_baseline:
            # one pytest per test file: one process holding every runtime at once needs more memory than a
            # shared machine may have (a process killed by the OOM killer exits -9)
            for selection in baseline_selections(chosen):
                outcome, elapsed, out = run_pytest(copies[0], selection, args.timeout * 2)
                print(f"baseline  {elapsed:6.1f} s  {outcome}: {' '.join(selection)}", flush=True)
                if outcome != "passed":
                    print(out[-4000:])
                    print("the selected tests fail without any mutant: fix them first"
                          + (" (killed: out of memory?)" if "-9" in outcome else ""), file=sys.stderr)
                    return 1
        free = list(copies)

        def one(mutant):
            copy = free.pop()
            try:
                return mutant, run_mutant(copy, mutant, args.timeout)
            finally:
                free.append(copy)

        results = []
        with ThreadPoolExecutor(max_workers=len(copies)) as pool:
            for mutant, (verdict, elapsed, out) in pool.map(one, chosen):
                results.append((mutant, verdict, elapsed))
                print(f"{verdict:9} {elapsed:6.1f} s  {mutant.area:18} {mutant.name}", flush=True)
                if args.verbose or verdict != "caught":
                    print("    " + "\n    ".join(out.strip().splitlines()[-15:]))

    bad = [r for r in results if r[1] != "caught"]
    print(f"\n| mutant | area | verdict | seconds |\n|---|---|---|---|")
    for mutant, verdict, elapsed in results:
        print(f"| {mutant.name} | {mutant.area} | {verdict} | {elapsed:.0f} |")
    print(f"\n{len(results) - len(bad)} of {len(results)} caught in {time.monotonic() - start:.0f} s"
          + (f"; not caught: {', '.join(r[0].name for r in bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
