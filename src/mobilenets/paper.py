"""What the paper and the official releases print, and the same tables recomputed.

The printed values are transcribed from arXiv:1704.04861 (Tables 2-7) and the
TF-slim 2018 release notes (ImageNet top-1 of the 16 alpha x resolution models,
float and 8-bit); our numbers come from ``cost.py``.  Where they differ the
difference is explained, never hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

from .atomic import atomic_write
from .cost import cost
from .weights import registry

# The 16 released models and their published ImageNet top-1 live in the weights registry (docs/published.md).
ALPHAS, RESOLUTIONS = registry.ALPHAS, registry.RESOLUTIONS


@dataclass(frozen=True)
class Row:
    """One printed cell of a paper table beside our recomputation."""

    table: str
    row: str
    column: str
    paper: str
    ours: str
    matches: bool
    note: str = ""

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _millions(n: int, digits: int) -> str:
    # the paper rounds to its printed digits; where it does not, the row's note says so
    return f"{n / 1e6:.{digits}f}"


def _explain(row: Row, note: str) -> Row:
    return Row(row.table, row.row, row.column, row.paper, row.ours, row.matches, note)


def _model_rows(table: str, label: str, c, paper_mult_adds: str, paper_params: str, mult_adds_digits=0) -> list[Row]:
    ours_ma = _millions(c.mult_adds, mult_adds_digits)
    ours_p = _millions(c.params, 1)
    return [
        Row(table, label, "Million Mult-Adds", paper_mult_adds, ours_ma, ours_ma == paper_mult_adds),
        Row(table, label, "Million Parameters", paper_params, ours_p, ours_p == paper_params),
    ]


def table2() -> list[Row]:
    """Resource per layer type for 1.0 MobileNet-224 (shares of mult-adds and of weights)."""
    c = cost(1.0, 224)
    fc = c.by_kind("fc")
    total_ma = c.mult_adds
    total_w = c.params - 1000  # Table 2 shares are of weights: the FC bias is not a layer type's weight
    parts = {
        "Conv 1x1": c.by_kind("pointwise"),
        "Conv DW 3x3": c.by_kind("depthwise"),
        "Conv 3x3": c.by_kind("conv"),
        "Fully Connected": fc,
    }
    printed = {
        "Conv 1x1": ("94.86%", "74.59%"),
        "Conv DW 3x3": ("3.06%", "1.06%"),
        "Conv 3x3": ("1.19%", "0.02%"),
        "Fully Connected": ("0.18%", "24.33%"),
    }
    rows = []
    for name, part in parts.items():
        weights = part.params - (1000 if name == "Fully Connected" else 0)
        ma = f"{100 * part.mult_adds / total_ma:.2f}%"
        w = f"{100 * weights / total_w:.2f}%"
        paper_ma, paper_w = printed[name]
        rows.append(Row("Table 2", name, "Mult-Adds", paper_ma, ma, ma == paper_ma))
        rows.append(Row("Table 2", name, "Parameters", paper_w, w, w == paper_w))
    for i, r in enumerate(rows):
        if not r.matches and r.column == "Mult-Adds":
            printed_sum = sum(float(x.paper[:-1]) for x in rows if x.column == "Mult-Adds")
            ours_sum = sum(float(x.ours[:-1]) for x in rows if x.column == "Mult-Adds")
            rows[i] = _explain(r, f"transposed digits in the paper: its column sums to {printed_sum:.2f}%, "
                                  f"ours to {ours_sum:.2f}%")
    return rows


def table3() -> list[Row]:
    """One layer (k=3, M=N=512, DF=14) as each modification is applied."""
    k, m, df = 3, 512, 14

    def separable(channels, size):
        return k * k * channels * size * size + channels * channels * size * size, k * k * channels + channels * channels

    alpha_c = int(m * 0.75)
    cases = [
        ("Convolution", (k * k * m * m * df * df, k * k * m * m), "462", "2.36", 0, 2),
        ("Depthwise Separable Conv", separable(m, df), "52.3", "0.27", 1, 2),
        ("alpha = 0.75", separable(alpha_c, df), "29.6", "0.15", 1, 2),
        ("rho = 0.714", separable(alpha_c, round(df * 0.714)), "15.1", "0.15", 1, 2),
    ]
    rows = []
    for label, (ma, p), paper_ma, paper_p, ma_digits, p_digits in cases:
        ours_ma, ours_p = _millions(ma, ma_digits), _millions(p, p_digits)
        rows.append(Row("Table 3", label, "Million Mult-Adds", paper_ma, ours_ma, ours_ma == paper_ma))
        rows.append(Row("Table 3", label, "Million Parameters", paper_p, ours_p, ours_p == paper_p))
    return rows


def table4() -> list[Row]:
    """Depthwise separable vs full convolution MobileNet."""
    full = cost(1.0, 224, full_conv=True)
    rows = _model_rows("Table 4", "Conv MobileNet", full, "4866", "29.3")
    if not rows[0].matches:
        without_fc = full.mult_adds - full.by_kind("fc").mult_adds
        rows[0] = _explain(rows[0], f"{full.mult_adds:,} rounds to {rows[0].ours}; the paper's 4866 is the count "
                                    f"without the FC layer ({without_fc:,})")
    rows += _model_rows("Table 4", "MobileNet", cost(1.0, 224), "569", "4.2")
    return rows


def table5() -> list[Row]:
    """Narrow (alpha = 0.75) vs shallow (rows 7-11 removed) MobileNet."""
    return (_model_rows("Table 5", "0.75 MobileNet", cost(0.75, 224), "325", "2.6")
            + _model_rows("Table 5", "Shallow MobileNet", cost(1.0, 224, shallow=True), "307", "2.9"))


def table6() -> list[Row]:
    """Width multiplier."""
    printed = {1.0: ("569", "4.2"), 0.75: ("325", "2.6"), 0.5: ("149", "1.3"), 0.25: ("41", "0.5")}
    rows = []
    for alpha, (ma, p) in printed.items():
        rows += _model_rows("Table 6", f"{alpha} MobileNet-224", cost(alpha, 224), ma, p)
    return rows


def table7() -> list[Row]:
    """Resolution multiplier."""
    printed = {224: "569", 192: "418", 160: "290", 128: "186"}
    rows = []
    for resolution, ma in printed.items():
        rows += _model_rows("Table 7", f"1.0 MobileNet-{resolution}", cost(1.0, resolution), ma, "4.2")
    for i, r in enumerate(rows):
        if not r.matches:
            c = cost(1.0, int(r.row.rsplit("-", 1)[1]))
            without_fc = c.mult_adds - c.by_kind("fc").mult_adds
            rows[i] = _explain(r, f"{c.mult_adds:,} rounds to {r.ours}; the paper's {r.paper} is that number truncated, "
                                  f"or the count without the FC layer ({without_fc:,}) rounded")
    return rows


def all_tables() -> list[Row]:
    return table2() + table3() + table4() + table5() + table6() + table7()


def grid() -> list[dict]:
    """The 16 alpha x resolution models: our exact cost beside the published accuracy."""
    out = []
    for alpha in ALPHAS:
        for resolution in RESOLUTIONS:
            c = cost(alpha, resolution)
            entry = registry.get(alpha, resolution)
            top1, top1_int8 = entry.top1, entry.top1_int8
            out.append({
                "model": f"{alpha}-{resolution}",
                "alpha": alpha,
                "resolution": resolution,
                "mult_adds": c.mult_adds,
                "params": c.params,
                "trainable_params": c.trainable_params,
                "top1": top1,
                "top1_int8": top1_int8,
            })
    return out


def plot_figures(directory) -> list:
    """The paper's Figures 4 and 5 for the 16 models: accuracy against mult-adds (log) and against params."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    points = grid()
    paths = []
    for name, key, xlabel, title in (
        ("figure4_accuracy_vs_mult_adds.png", "mult_adds", "Million Mult-Adds (log scale)",
         "Figure 4: ImageNet accuracy vs mult-adds"),
        ("figure5_accuracy_vs_params.png", "params", "Million Parameters (log scale)",
         "Figure 5: ImageNet accuracy vs parameters"),
    ):
        fig, ax = plt.subplots(figsize=(7, 5))
        for resolution, marker in zip(RESOLUTIONS, "osD^"):
            pts = [p for p in points if p["resolution"] == resolution]
            ax.scatter([p[key] / 1e6 for p in pts], [p["top1"] for p in pts], marker=marker, label=f"{resolution}px")
            for p in pts:
                ax.annotate(f"α={p['alpha']}", (p[key] / 1e6, p["top1"]), textcoords="offset points", xytext=(4, -8),
                            fontsize=7)
        ax.set_xscale("log")
        # plain numbers at round values: matplotlib's default minor labels overlap on a log axis
        lo, hi = min(p[key] for p in points) / 1e6, max(p[key] for p in points) / 1e6
        ticks = [t for t in (0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if lo / 1.5 <= t <= hi * 1.5]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ImageNet top-1 accuracy (%), TF-slim release")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="resolution")
        fig.tight_layout()
        path = directory / name
        try:
            atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
        finally:
            plt.close(fig)
        paths.append(path)
    return paths
