"""How far reduced-scale JPEG decoding moves predict's answers, against how far the pipelines users accept
for these weights move them: the reference that decides whether it may be predict's default.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/decode_agreement.py PHOTOS [--sources PHOTOS/sources.json]

PHOTOS: a folder of camera JPEGs; each subfolder holding images is one photo set (else the folder is one).
The photos stay outside the repository; ``--sources`` (default ``PHOTOS/sources.json`` when present) is a
JSON list of {"set", "file", "repo", "commit", "path", "licence", "sha256", ...}, copied into the results.
The 195 photos measured are listed in benchmarks/decode_agreement_sources.json; to rebuild the folder,
``git clone`` each repository named there into one folder CLONES (github.com/OWNER/NAME as CLONES/NAME), then

    .venv/bin/python benchmarks/decode_agreement.py PHOTOS --gather CLONES

copies each file out of its commit (``git show``), checks its sha256, and writes PHOTOS/sources.json.

Every photo is preprocessed for Google's MobileNet v1 1.0-224 (the real ImageNet weights, tests/real_data.py)
seven ways, and each is run through the same model (eager fp32):

- ``exact``: mobilenets.images (full decode, resize the shorter side to 256 with antialiasing, centre crop
  224): predict's preprocessing with ``exact=True``; torchvision's and timm's resize to within a grey level.
- ``twice the resize size``: decoded at the smallest DCT scale (1/2, 1/4, 1/8) leaving a shorter side of at
  least 2 x 256 = 512 (predict's default until issue 24's measure), then the same resize and crop.
- ``the resize size``: the smallest DCT scale whose shorter side still covers the crop after the 0.875
  centre crop (>= 256; images.draft_side, predict's default now), then the same resize and crop.
- ``TF-slim``: TensorFlow's decode_jpeg (its default DCT), then tf-models' inception_preprocessing
  preprocess_for_eval: central_crop(0.875), resize_bilinear to 224 x 224 (no antialiasing, the aspect
  ratio squashed), (x - 0.5) * 2: what these weights were evaluated with.
- ``Keras``: keras.utils.load_img(target_size=(224, 224)) (PIL, nearest neighbour, squashed) and
  keras.applications.mobilenet.preprocess_input, as Keras's documentation classifies an image.
- ``timm``: timm.data.create_transform(**resolve_data_config(model=model)) on the PIL image (these weights'
  pretrained_cfg: bilinear, crop_pct 0.875, mean = std = 0.5).
- ``torchvision``: Resize(256, bilinear) + CenterCrop(224) + ToTensor + Normalize(0.5, 0.5) on the PIL image.

All seven see the photo upright: the EXIF orientation is applied to TF's, timm's and torchvision's decoded
pixels before their crop and to Keras's 224 x 224 result (load_img ignores it), so the comparison is of
decoding and resizing, not of rotation (users of those pipelines who skip it get far worse answers).

For every pair of ways: top-1 agreement and mean KL(row || column) of the softmax outputs, per set and over
all photos.  The rule (issue 24): reduced-scale decoding may be the default if it agrees with exact at least
as well as the accepted pipelines (TF-slim, Keras, timm, torchvision) do; of the ways that pass against the
pipelines that compute differently from exact (TF-slim, Keras), predict takes the coarsest (the fastest).  Writes
benchmarks/results/decode_agreement.{json,md,png}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "benchmarks")]
RESULTS = ROOT / "benchmarks" / "results"
SOURCES = ROOT / "benchmarks" / "decode_agreement_sources.json"  # the photos measured, where each came from
RESOLUTION = 224

WAYS = ("exact", "twice the resize size", "the resize size", "TF-slim", "Keras", "timm", "torchvision")
REDUCED = ("twice the resize size", "the resize size")
ACCEPTED = ("TF-slim", "Keras", "timm", "torchvision")
# PIL's transposes per EXIF orientation (as ImageOps.exif_transpose applies them)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def upright(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """(H, W, 3) uint8 pixels turned as the EXIF orientation says, by PIL's own transposes."""
    if orientation not in UPRIGHT:
        return rgb
    return np.asarray(Image.fromarray(rgb).transpose(UPRIGHT[orientation]))


def tf_keras_inputs(files: list[Path], out: Path) -> None:
    """TF-slim's and Keras's inputs for ``files``, as float32 (2, N, 224, 224, 3) in ``out`` (.npy).

    Run in a process of its own (``--tf-keras``): TensorFlow and PyTorch's Triton crash when loaded together.
    """
    import keras
    import tensorflow as tf

    x = np.empty((2, len(files), RESOLUTION, RESOLUTION, 3), np.float32)
    for k, path in enumerate(files):
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            orientation = im.getexif().get(0x0112, 1)
        # TF-slim: tf-models' inception_preprocessing.preprocess_for_eval on TensorFlow's decoding
        image = tf.image.convert_image_dtype(upright(tf.io.decode_jpeg(data, channels=3).numpy(), orientation),
                                             tf.float32)
        image = tf.image.central_crop(image, central_fraction=0.875)
        image = tf.compat.v1.image.resize_bilinear(image[None], [RESOLUTION, RESOLUTION], align_corners=False)[0]
        x[0, k] = ((image - 0.5) * 2.0).numpy()
        # Keras: load_img squashes the whole photo to 224 x 224 (nearest), then preprocess_input
        rgb = upright(np.asarray(keras.utils.load_img(path, target_size=(RESOLUTION, RESOLUTION))), orientation)
        x[1, k] = keras.applications.mobilenet.preprocess_input(rgb.astype(np.float32))
    np.save(out, x)


class Ways:
    """The seven preprocessings of each photo, as float (3, 224, 224) inputs for the weights."""

    def __init__(self, model):
        import timm.data
        import torchvision.transforms as T

        self.timm = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
        self.torchvision = T.Compose([T.Resize(256, T.InterpolationMode.BILINEAR), T.CenterCrop(RESOLUTION),
                                      T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    def peers(self, files: list[Path]) -> "torch.Tensor":
        """TF-slim's and Keras's inputs, (2, N, 3, 224, 224), from a process of their own."""
        import subprocess
        import tempfile

        import torch

        with tempfile.TemporaryDirectory() as tmp:
            listing, out = Path(tmp) / "files.txt", Path(tmp) / "x.npy"
            listing.write_text("\n".join(str(f) for f in files))
            subprocess.run([sys.executable, __file__, "--tf-keras", str(listing), str(out)], check=True)
            return torch.from_numpy(np.load(out)).permute(0, 1, 4, 2, 3).contiguous()

    def __call__(self, path: Path) -> dict:
        from mobilenets import images

        x = {"exact": images.eval_transform(images.load_pixels(path), RESOLUTION),
             "twice the resize size": images.eval_transform(
                 images.load_pixels(path, min_side=2 * images.resize_size(RESOLUTION)), RESOLUTION),
             "the resize size": images.eval_transform(
                 images.load_pixels(path, min_side=images.resize_size(RESOLUTION)), RESOLUTION)}
        pil = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        x["timm"] = self.timm(pil)
        x["torchvision"] = self.torchvision(pil)
        return x


def gather(sources: list[dict], clones: Path, photos: Path) -> None:
    """The listed photos, out of git clones of their repositories (CLONES/NAME, bare or not), into
    PHOTOS/SET/FILE, each checked against its sha256."""
    import hashlib
    import subprocess

    from mobilenets.atomic import atomic_write

    for s in sources:
        clone = clones / s["repo"].split("/")[1]
        git_dir = clone / ".git" if (clone / ".git").exists() else clone
        data = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{s['commit']}:{s['path']}"],
                              capture_output=True, check=True).stdout
        if hashlib.sha256(data).hexdigest() != s["sha256"]:
            raise SystemExit(f"{s['repo']} {s['commit']}:{s['path']} is not the file measured (sha256 differs)")
        atomic_write(photos / s["set"] / s["file"], lambda f: f.write(data))
    atomic_write(photos / "sources.json", lambda f: f.write(json.dumps(sources, indent=1).encode()))


def photo_sets(folder: Path) -> dict[str, list[Path]]:
    from mobilenets import images

    sets = {d.name: images.list_images(d) for d in sorted(folder.iterdir())
            if d.is_dir() and any(p.suffix.lower() in (".jpg", ".jpeg") for p in d.iterdir())}
    return sets or {folder.name: images.list_images(folder)}


def compare(logits: dict[str, torch.Tensor]) -> dict:
    """Top-1 agreement and mean KL(row || column) for every pair of ways."""
    logp = {w: v.log_softmax(1) for w, v in logits.items()}
    top1 = {w: v.argmax(1) for w, v in logits.items()}
    return {a: {b: {"top1_agreement": float((top1[a] == top1[b]).float().mean()),
                    "disagreements": int((top1[a] != top1[b]).sum()),
                    "mean_kl": float((logp[a].exp() * (logp[a] - logp[b])).sum(1).mean())}
                for b in WAYS} for a in WAYS}


def verdict(matrix: dict) -> dict:
    """Issue 24's rule for each reduced-scale way: its agreement with exact against the accepted pipelines'."""
    accepted = {p: matrix["exact"][p]["top1_agreement"] for p in ACCEPTED}
    pairwise = [matrix[a][b]["top1_agreement"] for i, a in enumerate(ACCEPTED) for b in ACCEPTED[i + 1:]]
    out = {"accepted_vs_exact": accepted, "accepted_pairwise_min": min(pairwise),
           "accepted_pairwise_max": max(pairwise)}
    for way in REDUCED:
        agree, kl = matrix["exact"][way]["top1_agreement"], matrix["exact"][way]["mean_kl"]
        out[way] = {"top1_agreement": agree, "mean_kl": kl,
                    "at_least_as_good_as": [p for p in ACCEPTED if agree >= accepted[p]
                                            and kl <= matrix["exact"][p]["mean_kl"]],
                    "worse_than": [p for p in ACCEPTED if agree < accepted[p] or kl > matrix["exact"][p]["mean_kl"]]}
    return out


def coarsest_passing(v: dict) -> str | None:
    """The coarsest reduced-scale way (REDUCED runs finest to coarsest) at least as close to exact as TF-slim
    and Keras, the accepted pipelines that compute differently from exact (timm's and torchvision's are exact's)."""
    passing = [w for w in REDUCED if {"TF-slim", "Keras"} <= set(v[w]["at_least_as_good_as"])]
    return passing[-1] if passing else None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*result["sets"], "all"]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.6), squeeze=False)
    short = ["exact", "2x resize", "resize", "TF-slim", "Keras", "timm", "tv"]
    for ax, name in zip(axes[0], names):
        r = result["sets"][name] if name != "all" else result["all"]
        m = np.array([[r["matrix"][a][b]["top1_agreement"] * 100 for b in WAYS] for a in WAYS])
        ax.imshow(m, vmin=80, vmax=100, cmap="viridis")
        for i in range(len(WAYS)):
            for j in range(len(WAYS)):
                ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=6.5,
                        color="white" if m[i, j] < 92 else "black")
        ax.set_xticks(range(len(WAYS)), short, rotation=60, fontsize=7)
        ax.set_yticks(range(len(WAYS)), short, fontsize=7)
        ax.set_title(f"{name} ({r['images']} photos)", fontsize=9)
    fig.suptitle("top-1 agreement (%), MobileNet v1 1.0-224, real weights", fontsize=10)
    fig.tight_layout()
    from mobilenets.atomic import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))


def main() -> int:
    if sys.argv[1:2] == ["--tf-keras"]:  # the TensorFlow process (see tf_keras_inputs)
        tf_keras_inputs([Path(p) for p in Path(sys.argv[2]).read_text().splitlines()], Path(sys.argv[3]))
        return 0
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("photos", help="folder of camera JPEGs (each subfolder of images is one set)")
    ap.add_argument("--sources", default=None, help="JSON list of where each photo came from "
                                                    "(default PHOTOS/sources.json when present)")
    ap.add_argument("--gather", metavar="CLONES", default=None,
                    help="first copy the photos of benchmarks/decode_agreement_sources.json out of git clones "
                         "of their repositories in CLONES (CLONES/NAME) into PHOTOS")
    ap.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "mobilenets-predict-bench"))
    args = ap.parse_args()
    import mobilenets
    from predict_throughput import cpu_name, real_weights_and_calibration

    folder = Path(args.photos)
    if args.gather:
        gather(json.loads(SOURCES.read_text()), Path(args.gather), folder)
    sources_file = Path(args.sources) if args.sources else folder / "sources.json"
    sources = json.loads(sources_file.read_text()) if sources_file.is_file() else []
    weights, _ = real_weights_and_calibration(Path(args.work))
    model = mobilenets.load(weights).eval()
    ways = Ways(model)
    before = os.getloadavg()
    start = time.perf_counter()
    sets, all_logits, per_photo = {}, {w: [] for w in WAYS}, []
    for name, files in photo_sets(folder).items():
        logits = {w: [] for w in WAYS}
        peers = ways.peers(files)
        for k, f in enumerate(files):
            x = {**ways(f), "TF-slim": peers[0, k], "Keras": peers[1, k]}
            with torch.inference_mode():
                out = model(torch.stack([x[w] for w in WAYS]))
            for i, w in enumerate(WAYS):
                logits[w].append(out[i])
            per_photo.append({"set": name, "file": f.name, "top1": {w: int(out[i].argmax()) for i, w in enumerate(WAYS)},
                              "grey_levels_from_exact": {w: float((x[w] - x["exact"]).abs().mean()) * 127.5
                                                         for w in WAYS}})
        logits = {w: torch.stack(v) for w, v in logits.items()}
        for w in WAYS:
            all_logits[w].append(logits[w])
        matrix = compare(logits)
        sets[name] = {"images": len(files), "matrix": matrix, "verdict": verdict(matrix)}
        print(name, len(files), {w: f"{matrix['exact'][w]['top1_agreement']:.2%}" for w in WAYS}, flush=True)
    all_logits = {w: torch.cat(v) for w, v in all_logits.items()}
    matrix = compare(all_logits)
    import PIL
    import timm
    import torchvision
    from importlib.metadata import version

    result = {"command": "OMP_NUM_THREADS=2 .venv/bin/python " + " ".join(["benchmarks/decode_agreement.py",
                                                                             *sys.argv[1:]]),
              "cpu": cpu_name(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "seconds": time.perf_counter() - start, "loadavg": [before, os.getloadavg()],
              "versions": {"torch": torch.__version__, "PIL": PIL.__version__, "tensorflow": version("tensorflow"),
                           "keras": version("keras"), "timm": timm.__version__,
                           "torchvision": torchvision.__version__},
              "ways": list(WAYS), "accepted": list(ACCEPTED), "sets": sets,
              "all": {"images": len(per_photo), "matrix": matrix, "verdict": verdict(matrix)},
              "photos": per_photo, "sources": sources}
    RESULTS.mkdir(parents=True, exist_ok=True)
    from mobilenets.atomic import atomic_write

    atomic_write(RESULTS / "decode_agreement.json", lambda f: f.write(json.dumps(result, indent=1).encode()))
    plot(result, RESULTS / "decode_agreement.png")
    text = "\n".join(report(result)) + "\n"
    atomic_write(RESULTS / "decode_agreement.md", lambda f: f.write(text.encode()))
    print(text)
    return 0


def report(result: dict) -> list[str]:
    lines = [f"# Reduced-scale JPEG decoding against the pipelines accepted for these weights ({result['date']})", "",
             f"    {result['command']}", "",
             f"CPU: {result['cpu']}; load average {result['loadavg'][0][0]:.2f} before, "
             f"{result['loadavg'][1][0]:.2f} after. Google's MobileNet v1 1.0-224 ImageNet weights, eager fp32; "
             f"{result['all']['images']} camera JPEGs of 5 to 26 megapixels (sources below, kept out of the "
             f"repository). Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".", "",
             "## Against exact decoding", "",
             "Top-1 agreement with `exact` (photos whose answer differs) and mean KL(exact || way) in nats.", "",
             "| way | " + " | ".join(f"{n} ({r['images']})" for n, r in [*result["sets"].items(),
                                                                       ("all", result["all"])]) + " |",
             "|---|" + "---:|" * (len(result["sets"]) + 1)]
    for w in result["ways"][1:]:
        cells = []
        for r in [*result["sets"].values(), result["all"]]:
            m = r["matrix"]["exact"][w]
            cells.append(f"{m['top1_agreement']:.2%} ({m['disagreements']}), {m['mean_kl']:.4f}")
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    lines += ["", "## Every pair, all photos", "",
              "Top-1 agreement, row against column (KL(row || column) in nats below it).", "",
              "| | " + " | ".join(result["ways"]) + " |", "|---|" + "---:|" * len(result["ways"])]
    m = result["all"]["matrix"]
    for a in result["ways"]:
        lines.append(f"| {a} | " + " | ".join(f"{m[a][b]['top1_agreement']:.2%}<br>{m[a][b]['mean_kl']:.4f}"
                                             for b in result["ways"]) + " |")
    v = result["all"]["verdict"]
    lines += ["", "![agreement matrix](decode_agreement.png)", "", "## The rule", "",
              "Reduced-scale decoding may be predict's default if it agrees with exact at least as well as the "
              "pipelines accepted for these weights do (issue 24). timm's and torchvision's transforms compute "
              "exact's preprocessing (PIL's full decode and bilinear filter, which ours equals within a grey "
              "level), so their agreement is exact's with itself; TF-slim (what the weights were evaluated with) "
              "and Keras preprocess differently, and are the spread users accept. Over all photos "
              f"`twice the resize size` agrees {v['twice the resize size']['top1_agreement']:.2%} "
              f"(KL {v['twice the resize size']['mean_kl']:.4f}) and `the resize size` "
              f"{v['the resize size']['top1_agreement']:.2%} (KL {v['the resize size']['mean_kl']:.4f}), against "
              f"TF-slim's {v['accepted_vs_exact']['TF-slim']:.2%} and Keras's {v['accepted_vs_exact']['Keras']:.2%}. "
              + (f"The coarsest at least as close to exact as both of those is `{coarsest_passing(v)}`: predict "
                 "decodes at it unless `--exact`." if coarsest_passing(v) else
                 "Neither is as close to exact as both of those: predict should decode every pixel."), ""]
    for name, r in [*result["sets"].items(), ("all", result["all"])]:
        v = r["verdict"]
        accepted = ", ".join(f"{p} {a:.2%}" for p, a in v["accepted_vs_exact"].items())
        lines.append(f"- **{name}**: accepted pipelines against exact: {accepted} (among themselves "
                     f"{v['accepted_pairwise_min']:.2%} to {v['accepted_pairwise_max']:.2%}).")
        for way in REDUCED:
            lines.append(f"  `{way}`: {v[way]['top1_agreement']:.2%}, KL {v[way]['mean_kl']:.4f}; at least as close "
                         f"to exact (agreement and KL) as: {', '.join(v[way]['at_least_as_good_as']) or 'none'}; "
                         f"further than: {', '.join(v[way]['worse_than']) or 'none'}.")
    if result["sources"]:
        by_repo = {}
        for s in result["sources"]:
            by_repo.setdefault((s["repo"], s["commit"], s["licence"]), []).append(s)
        lines += ["", "## Photos", ""]
        for (repo, commit, licence), items in by_repo.items():
            sets = sorted({s.get("set", "") for s in items})
            lines.append(f"- github.com/{repo} at {commit[:12]}: {len(items)} JPEGs ({', '.join(sets)}); "
                         f"licence: {licence}")
        lines.append("")
        lines.append("Every file, its path in the repository and its sha256: `sources` in decode_agreement.json.")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
