"""Mechanical mutation testing of the core modules: a seeded random sample of cosmic-ray's mutants per module.

    .venv/bin/python tools/mutation_sample.py [--modules cost checkpoint ...] [--per-module 15] [--seed N]
                                              [--timeout 600] [--out benchmarks/results/mutation_sample]
    .venv/bin/python tools/mutation_sample.py --only ID ... --modules M ...   # a rerun of triaged survivors
    .venv/bin/python tools/mutation_sample.py --merge A.json B.json ... --out OUT --seed N   # one table of runs

The measure of the suite is this sample, not tools/mutation_check.py's hand-written list (the bugs someone
thought of; a regression list only). cosmic-ray (the ``test`` extra) enumerates every mutant of a module's
files (operators swapped, comparisons flipped, constants changed, ``break``/``continue`` exchanged, ...);
this script draws ``--per-module`` of them with ``--seed`` and runs each against only the test files that
cover that module (``MODULES`` below), with a per-mutant timeout (a timeout counts as killed: the mutant
made the tests hang). Each mutant runs in a copy of the checkout in a temp folder, so the working tree is
never changed, and under ``nice``. A full run does not fit in CI on 2 cores, hence the sample.

Results go to ``<out>.json`` (every sampled mutant: id, line, diff, outcome) and ``<out>.md`` (the score per
module). The draw passes over mutants that test nothing, recorded as "passed over" and not counted: those inside an
annotation of a module that postpones them (equivalent by construction) and those that are not Python (cosmic-ray
writes e.g. ``def f(a, |, b)``; they fail on import and would count as killed). Survivors are triaged by hand in ``benchmarks/results/mutation_triage.json``: for each survivor's
id, either ``{"killed_by": "tests/test_x.py::test_y"}`` (a test added to kill it) or ``{"equivalent":
"one-line reason"}``. The score per module is killed / (sampled - equivalent), where a survivor that a
triaged test kills counts as killed only after a rerun shows it (``--rerun-triaged``). Target: 85% or more
in every module, on a sample drawn after the last code change.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRIAGE = ROOT / "benchmarks" / "results" / "mutation_triage.json"

_TRAIN_TESTS = ["test_rmsprop_tf_matches_timm_rmsproptf", "test_a_constant_schedule_keeps_lr_after_the_warm_up_whatever_the_others_do",
                "test_rmsprop_tf_is_tf_update_formula",
                "test_no_weight_decay_on_depthwise_bn_or_bias", "test_paper_schedule_is_staircase_0_94_every_2_5_epochs",
                "test_modern_schedule_warms_up_then_cosine_to_lr_min",
                "test_ema_follows_tf_formula_with_its_warm_up_on_a_toy_module",
                "test_ema_of_a_training_run_is_the_formula_over_the_weights_it_saw",
                "test_the_lr_applied_at_each_step_is_the_recipes_formula",
                "test_the_lr_recorded_for_an_epoch_is_the_one_its_last_step_ran_at",
                "test_a_training_set_smaller_than_one_batch_is_refused_naming_both",
                "test_the_optimizer_decays_exactly_the_full_and_pointwise_conv_and_classifier_weights",
                "test_the_file_labelled_ema_holds_the_ema_weights", "test_options_set_to_zero_mean_zero",
                "test_label_smoothing_changes_the_loss_by_its_formula",
                "test_a_resumed_run_continues_adamw_the_lr_and_the_ema_by_their_formulas",
                "test_the_loader_choice_is_made_for_each_process_share_of_the_images",
                "test_the_progress_line_reports_the_loaders_images_per_cpu_second_and_the_wait",
                "test_a_lone_process_choosing_its_threads_leaves_out_the_cores_other_programs_keep_busy",
                "test_last_pt_records_the_optimizer_steps_taken",
                "test_best_pt_keeps_the_epoch_of_the_highest_top1_and_skips_a_nan_one",
                "test_the_epochs_split_of_waiting_and_computing_is_written_out",
                "test_finetune_preset_lowers_lr_and_warms_up_unless_given",
                "test_the_error_names_the_epoch_and_step_at_which_the_loss_stopped_being_finite",
                "test_the_input_meter_counts_a_batch_without_timing_as_no_cpu_seconds",
                "test_fine_tuning_to_new_classes_refuses_weights_whose_body_does_not_fit",
                "test_a_two_epoch_run_numbers_its_epochs_from_one_and_counts_its_steps",
                "test_each_epochs_train_loss_and_top1_are_the_means_over_its_own_steps",
                "test_a_run_resumed_by_another_number_of_processes_says_so_and_reseeds_from_its_seed",
                "test_the_model_costs_the_loader_its_cores_only_when_it_runs_on_the_cpu"]
_PREDICT_TESTS = ["test_folder_in_every_mode_with_preprocessing_from_metadata", "test_batching_does_not_change_results",
                  "test_checkpoint_metadata_drives_resolution_normalization_and_labels",
                  "test_a_model_without_metadata_uses_224_px_and_x_over_127_5_minus_1",
                  "test_a_single_path_a_pil_image_and_tensors_are_one_image_each",
                  "test_decode_predictions_matches_softmax_topk",
                  "test_the_table_gives_each_class_its_softmax_probability_in_percent",
                  "test_eval_transform_equals_resize_then_crop_by_torchvision",
                  "test_cli_predict_classifies_with_the_weights_file_it_names",
                  "test_fp32_with_no_backend_asks_auto_with_the_number_of_images",
                  "test_each_answer_names_an_input_given_in_memory_by_its_position",
                  "test_a_tensor_that_is_not_one_image_or_a_batch_of_them_is_refused_saying_which_shapes_work",
                  "test_cli_imagenet_weights_from_the_server",
                  "test_predicts_progress_counts_every_image_answered_or_skipped",
                  "test_labels_that_do_not_name_each_class_once_are_refused",
                  "test_int8_from_float_weights_without_calibration_images_says_what_would_work",
                  "test_a_named_file_that_is_no_image_is_an_error_while_one_in_a_folder_is_skipped"]
_QUANTIZE_TESTS = ["test_equalization_keeps_the_float_model",
                   "test_bias_correction_zeroes_every_layers_mean_error_on_the_calibration_images",
                   "test_calibration_clips_no_logit", "test_weights_rounded_by_output_error_stay_on_the_int8_grid",
                   "test_input_hessian_is_the_mean_outer_product_of_every_window_whatever_the_chunking",
                   "test_preparation_is_the_two_calibrations_and_the_less_divergent_one",
                   "test_fake_quant_values_are_torchs_fake_quantize_bit_for_bit",
                   "test_rounding_by_error_is_the_column_by_column_algorithm",
                   "test_input_windows_are_unfolds_windows_bit_for_bit", "test_int8_ready_file_round_trips",
                   "test_simulation_computes_what_onnx_runtime_runs", "test_bad_input_is_refused_with_what_works",
                   "test_rounding_by_error_needs_enough_calibration_windows",
                   "test_calibration_rounds_weights_by_error",
                   "test_calibrating_both_roundings_at_once_gives_each_alone_and_the_float_logits",
                   "test_a_percentile_range_is_numpys_nearest_percentiles_of_each_sign",
                   "test_activation_qparams_are_torchs_min_max_observers",
                   "test_cli_quantize_writes_int8_ready_weights",
                   "test_int8_folding_carries_the_prepared_ranges_unless_plain_is_asked",
                   "test_single_clip_gives_each_layer_the_smallest_of_its_channel_clips"]
_DEPLOY_TESTS = ["test_backend_parity_with_fp32_eager", "test_predictor_pads_odd_batches_and_takes_numpy",
                 "test_predictor_errors_say_what_would_work", "test_bad_arguments_are_refused_before_building",
                 "test_openvino_models_destroyed_out_of_order_leave_signals_deliverable",
                 "test_openvino_export_keeps_its_precision", "test_openvino_int8_runs_int8_convolutions",
                 "test_export_reloads_with_parity", "test_pixels_and_streams_answer_as_the_float_input",
                 "test_pixels_normalise_each_channel_as_to_tensor",
                 "test_openvino_streams_as_many_batches_at_once_as_openvino_asks",
                 "test_openvino_int8_of_its_own_without_nncf_says_what_would_work"]

# module -> (source files mutated, the tests that cover them); tests chosen to be the ones a bug in those sources
# should fail, and short enough to run once per mutant on a busy 2-core machine (a test file, or node ids where
# the whole file takes minutes: the in-process tests of test_train, test_predict and test_quantize)
MODULES = {
    "images": (["src/mobilenets/images.py", "src/mobilenets/pipeline.py"],
               ["tests/test_images.py",
                # pipeline's recovery from a decoding worker's death: a real SIGKILL (~10 s)
                "tests/test_no_silent_nonsense.py::test_a_killed_decoding_worker_loses_no_image_and_says_so_in_one_line"]),
    "data": (["src/mobilenets/data.py"], ["tests/test_data.py"]),
    "train": (["src/mobilenets/train/optim.py", "src/mobilenets/train/loop.py"],
              [f"tests/test_train.py::{t}" for t in _TRAIN_TESTS]),
    "evaluate": (["src/mobilenets/evaluate.py", "src/mobilenets/predict.py"],
                 ["tests/test_evaluate.py"] + [f"tests/test_predict.py::{t}" for t in _PREDICT_TESTS]),
    "converters": (["src/mobilenets/weights/keras.py", "src/mobilenets/weights/tf_slim.py",
                    "src/mobilenets/weights/tf_frozen.py", "src/mobilenets/weights/tflite.py",
                    "src/mobilenets/weights/timm.py", "src/mobilenets/weights/layout.py"],
                   ["tests/test_weights.py", "tests/test_tf_frozen.py",
                    # weights/tflite.py's import is tested in test_litert (its exporter writes the files; ~65 s)
                    "tests/test_litert.py::test_export_then_import_round_trips",
                    "tests/test_litert.py::test_a_relu_model_round_trips_as_relu",
                    # an int8 file's import (TensorFlow's int8 files are tested too, but need TensorFlow)
                    "tests/test_litert.py::test_an_int8_file_imports_as_the_model_its_integers_stand_for",
                    "tests/test_litert.py::test_a_pad_other_than_the_same_amounts_on_height_and_width_is_refused_naming_it",
                    "tests/test_litert.py::test_a_stride_2_layers_explicit_pad_reads_as_the_padding_it_computes",
                    "tests/test_litert.py::test_a_stride_1_layers_explicit_pad_reads_as_same_only_when_it_keeps_the_layers_size",
                    "tests/test_litert.py::test_a_file_whose_layers_disagree_on_padding_or_activation_is_refused_naming_it",
                    "tests/test_litert.py::test_a_float16_file_imports_as_its_float16_weights_and_answers_as_litert_runs_it",
                    "tests/test_litert.py::test_weights_without_values_or_scales_and_a_metadata_record_that_is_no_object_are_refused",
                    "tests/test_litert.py::test_a_1001_class_file_drops_the_background_class_unless_asked_to_keep_it",
                    "tests/test_litert.py::test_pointwise_convolutions_written_valid_read_as_the_same_model",
                    "tests/test_litert.py::test_crafted_files_are_refused_in_one_line",
                    "tests/test_litert.py::test_an_operator_of_another_network_inside_the_body_is_refused_naming_it",
                    "tests/test_litert.py::test_a_classifier_of_other_classes_gets_no_imagenet_labels",
                    "tests/test_litert.py::test_a_release_tgz_converts_as_the_tflite_it_holds_within_the_size_bound",
                    # files that point outside themselves or claim sizes they do not hold (~7 s)
                    "tests/test_weights_hostile.py::test_keras_h5_that_reads_other_files_is_refused_naming_the_dataset",
                    "tests/test_weights_hostile.py::test_sizes_a_file_claims_are_bounded_before_anything_is_allocated",
                    "tests/test_weights_hostile.py::test_a_tgz_member_over_the_bound_is_never_extracted",
                    # layout.adapt_first_conv against timm's own adapt_input_conv (~12 s)
                    "tests/test_peer_timm.py::test_pretrained_grey_input_gives_the_rgb_answer"]),
    "quantize": (["src/mobilenets/quantize/calibrate.py", "src/mobilenets/quantize/sim.py",
                  "src/mobilenets/quantize/rounding.py", "src/mobilenets/deploy/prepare.py"],
                 [f"tests/test_quantize.py::{t}" for t in _QUANTIZE_TESTS] +
                 # deploy/prepare.py's cache of prepared int8 models, keyed and signed (~30 s at load 7)
                 ["tests/test_caches.py::test_int8_entries_are_trusted_only_when_signed_by_a_private_cache"]),
    # the runtimes predict hands batches to: the Predictor's padding, pixels and stream, and OpenVINO's graphs
    "deploy": (["src/mobilenets/deploy/predictor.py", "src/mobilenets/deploy/openvino.py"],
               [f"tests/test_deploy.py::{t}" for t in _DEPLOY_TESTS] +
               ["tests/test_predict.py::test_streamed_runtime_keeps_order_around_batches_that_all_fail"]),
    "checkpoint": (["src/mobilenets/checkpoint.py"], ["tests/test_checkpoint.py"]),
    "cost": (["src/mobilenets/cost.py"], ["tests/test_cost.py", "tests/test_paper.py"]),
}


def _copy_checkout(into: Path) -> Path:
    """The checkout's src, tests, tools and project files, without caches (a stale .pyc could hide a mutant)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in ("src", "tests", "tools", "docs"):
        if (ROOT / name).exists():
            shutil.copytree(ROOT / name, into / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "Makefile"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, into / name)
    if (ROOT / ".test-cache").exists():  # the real test data, fetched once (tests/conftest.py)
        (into / ".test-cache").symlink_to(ROOT / ".test-cache")
    return into


def _mutants(copy: Path, sources: list[str]) -> list:
    """Every cosmic-ray work item (one mutation each) of ``sources`` in the copy, in a stable order."""
    from cosmic_ray.commands.init import init
    from cosmic_ray.work_db import WorkDB, use_db

    with use_db(str(copy / "session.sqlite"), WorkDB.Mode.create) as db:
        init([copy / s for s in sources], db, {})
        items = list(db.pending_work_items)
    return sorted(items, key=lambda w: (str(w.mutations[0].module_path), w.mutations[0].operator_name,
                                        w.mutations[0].occurrence))


def annotation_spans(path: Path) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The (start, end) positions of every annotation in a module that postpones them (``from __future__ import
    annotations``): a mutant there changes a string nobody evaluates, so it is equivalent by construction."""
    import ast

    tree = ast.parse(path.read_text())
    if not any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
               any(a.name == "annotations" for a in n.names) for n in tree.body):
        return []
    found = []
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, ast.arg):
            annotations.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        found += [((a.lineno, a.col_offset), (a.end_lineno, a.end_col_offset)) for a in annotations if a is not None]
    return found


def _in_annotation(copy: Path, spec, spans: dict) -> bool:
    where = tuple(spec.start_pos)
    return any(a <= where < b for a, b in spans[str(Path(spec.module_path).relative_to(copy))])


def _compiles(spec) -> bool:
    """Whether the mutated module is Python at all: cosmic-ray also writes mutants such as ``def f(a, |, b)``
    (``*`` replaced in a signature) that fail on import, so every test fails and they would count as killed
    without having tested anything."""
    from cosmic_ray.mutating import mutate_code
    from cosmic_ray.plugins import get_operator

    code = mutate_code(Path(spec.module_path).read_text(), get_operator(spec.operator_name)(), spec.occurrence)
    try:
        compile(code or "", str(spec.module_path), "exec")
    except SyntaxError:
        return False
    return True


def draw(copy: Path, items: list, spans: dict, n: int, rng: random.Random) -> tuple[list, list]:
    """``n`` mutants in a seeded random order, passing over those that test nothing: inside a postponed
    annotation (equivalent by construction) or not valid Python (incompetent). Returns (drawn, passed over
    with the reason), so that ``n`` is the number of mutants that actually measure the tests."""
    order = rng.sample(items, len(items))
    drawn, skipped = [], []
    for item in order:
        if len(drawn) == n:
            break
        spec = item.mutations[0]
        if _in_annotation(copy, spec, spans):
            skipped.append((item, "annotation"))
        elif not _compiles(spec):
            skipped.append((item, "incompetent"))
        else:
            drawn.append(item)
    return drawn, skipped


def mutant_id(copy: Path, spec) -> str:
    return f"{Path(spec.module_path).relative_to(copy)}:{spec.operator_name}:{spec.occurrence}"


def run(modules: list[str], per_module: int, seed: int, timeout: float, only=None) -> list[dict]:
    from cosmic_ray.mutating import mutate_and_test

    rows = []
    with tempfile.TemporaryDirectory(prefix="mutation-sample-") as tmp:
        copy = _copy_checkout(Path(tmp))
        cwd = os.getcwd()
        os.chdir(copy)  # the test command runs here, on the copy's src (tests/conftest.py puts it first)
        try:
            for module in modules:
                sources, tests = MODULES[module]
                items = _mutants(copy, sources)
                spans = {src: annotation_spans(copy / src) for src in sources}
                if only:  # named mutants (a rerun after triage), whether or not this seed draws them
                    sample, skipped = [w for w in items if mutant_id(copy, w.mutations[0]) in only], []
                else:
                    sample, skipped = draw(copy, items, spans, per_module, random.Random(f"{seed}:{module}"))
                print(f"{module}: {len(items)} mutants, {len(sample)} sampled ({len(skipped)} passed over: in an "
                      f"annotation or not Python)", flush=True)
                command = f"nice {sys.executable} -m pytest -x -q -p no:cacheprovider {' '.join(tests)}"
                # the unmutated code must pass first: a failing (or missing) test would count every mutant killed
                start = time.time()
                try:
                    baseline = subprocess.run(command.split(), capture_output=True, text=True, timeout=timeout)
                    failed, output = baseline.returncode != 0, baseline.stdout[-2000:]
                except subprocess.TimeoutExpired:  # every mutant would time out too, and count as killed
                    failed, output = True, f"over the {timeout:.0f} s timeout"
                if failed:
                    print(f"  the tests fail without a mutant; {module} not sampled:\n{output}", flush=True)
                    rows.append({"module": module, "id": "baseline", "line": 0, "operator": "", "seconds":
                                 round(time.time() - start, 1), "outcome": "baseline failed", "diff": ""})
                    continue
                print(f"  baseline passes in {time.time() - start:.0f} s", flush=True)
                rows += [{"module": module, "id": mutant_id(copy, w.mutations[0]), "line": w.mutations[0].start_pos[0],
                          "operator": w.mutations[0].operator_name, "outcome": f"passed over ({why})", "seconds": 0.0,
                          "diff": ""} for w, why in skipped]
                for item in sample:
                    spec = item.mutations[0]
                    start = time.time()
                    if _in_annotation(copy, spec, spans):
                        rows.append({"module": module, "id": mutant_id(copy, spec), "line": spec.start_pos[0],
                                     "operator": spec.operator_name, "outcome": "annotation", "seconds": 0.0,
                                     "diff": ""})
                        print(f"  {rows[-1]['id']} (line {spec.start_pos[0]}): in an annotation, equivalent", flush=True)
                        continue
                    result = mutate_and_test(item.mutations, command, timeout)
                    outcome = result.test_outcome.value if result.test_outcome else result.worker_outcome.value
                    rows.append({"module": module, "id": mutant_id(copy, spec), "line": spec.start_pos[0],
                                 "operator": spec.operator_name, "outcome": outcome,
                                 "seconds": round(time.time() - start, 1), "diff": result.diff or ""})
                    print(f"  {rows[-1]['id']} (line {spec.start_pos[0]}): {outcome} in {rows[-1]['seconds']} s",
                          flush=True)
        finally:
            os.chdir(cwd)
    return rows


def scores(rows: list[dict], triage: dict) -> dict:
    """Per module: sampled, killed, survived, equivalent (triaged, or in an annotation), untriaged survivors,
    score (killed / non-equivalent)."""
    out = {}
    for module in sorted({r["module"] for r in rows}):
        mine = [r for r in rows if r["module"] == module and r["outcome"] in ("killed", "survived", "annotation")]
        equivalent = [r for r in mine if r["outcome"] == "annotation" or
                      (r["outcome"] == "survived" and "equivalent" in triage.get(r["id"], {}))]
        # a survivor whose triage names a killing test counts as killed only once a rerun (--only) shows it
        killed = [r for r in mine if r["outcome"] == "killed"]
        survived = [r for r in mine if r["outcome"] == "survived" and r not in equivalent]
        live = len(mine) - len(equivalent)
        out[module] = {"sampled": len(mine), "killed": len(killed), "survived": len(survived),
                       "equivalent": len(equivalent), "untriaged": [r["id"] for r in survived if r["id"] not in triage],
                       "score": round(len(killed) / live, 3) if live else None}
    return out


def _commit() -> str:
    """HEAD, marked "+changes" when src/ or tests/ differ from it (the copy holds the working tree)."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src", "tests"], capture_output=True,
                           text=True).stdout.strip()
    return head + (" +changes" if dirty else "")


def write(out: Path, rows: list[dict], args, commit: str) -> None:
    triage = json.loads(TRIAGE.read_text()) if TRIAGE.exists() else {}
    table = scores(rows, triage)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"commit": commit, "seed": args.seed, "per_module": args.per_module, "timeout_s": args.timeout,
         "scores": table, "mutants": rows}, indent=1) + "\n")
    lines = [f"# Mutation sample (cosmic-ray), commit {commit}, seed {args.seed}, {args.per_module} per module",
             "", f"    {' '.join(sys.argv)}", "",
             "| module | sampled | killed | survived | equivalent | score |", "|---|---|---|---|---|---|"]
    for module, s in table.items():
        score = "n/a" if s["score"] is None else f"{100 * s['score']:.0f}%"
        lines.append(f"| {module} | {s['sampled']} | {s['killed']} | {s['survived']} | {s['equivalent']} | {score} |")
    lines += ["", "Survivors (triage: benchmarks/results/mutation_triage.json):", ""]
    for r in rows:
        if r["outcome"] == "survived":
            t = triage.get(r["id"], {})
            note = t.get("equivalent") and f"equivalent: {t['equivalent']}" or t.get("killed_by") and \
                f"killed by {t['killed_by']}" or "untriaged"
            lines.append(f"- `{r['id']}` line {r['line']}: {note}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", choices=sorted(MODULES), default=sorted(MODULES))
    parser.add_argument("--per-module", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant; a timeout counts as killed")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mutation_sample")
    parser.add_argument("--only", nargs="*", default=None, help="mutant ids to run (e.g. survivors after triage)")
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="no run: combine earlier runs' JSON files into --out, a later file's row replacing an "
                             "earlier one of the same mutant (a rerun after triage)")
    args = parser.parse_args(argv)
    if args.merge:
        merged = {}
        for path in args.merge:
            for row in json.loads(path.read_text())["mutants"]:
                merged[(row["module"], row["id"])] = row
        ran = {module for module, id in merged if id != "baseline"}  # a module sampled later, after a failed baseline
        merged = {key: row for key, row in merged.items() if key[1] != "baseline" or key[0] not in ran}
        commits = sorted({json.loads(path.read_text())["commit"] for path in args.merge})
        write(args.out, list(merged.values()), args, ", ".join(commits))
        print(args.out.with_suffix(".md").read_text())
        return 0
    # OpenMP threads that spin while waiting starve each other on a busy machine: quantize's unmutated tests took
    # over 600 s at load 9 with the default policy, 81 s with passive waits (same threads, same results)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    commit = _commit()  # what the copy is taken from, before it is taken
    rows = run(args.modules, args.per_module, args.seed, args.timeout, args.only)
    write(args.out, rows, args, commit)
    table = scores(rows, json.loads(TRIAGE.read_text()) if TRIAGE.exists() else {})
    print(json.dumps(table, indent=1))
    return 0 if all(s["score"] is None or s["score"] >= 0.85 for s in table.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
