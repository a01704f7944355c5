"""Tables, paired differences and plots from `bench/ablation.py` results.

    .venv/bin/python bench/ablation_report.py RESULT.json [RESULT.json ...] [--plots bench/results/ablation]

Runs are grouped by their setting (image and object size, classes, steps, batch, learning rate,
held-out split), whatever file they came from, so that one table can be assembled from several
processes that trained different rows. Rows of one setting share data, batches, flips and seeds,
so the difference between two rows is taken seed by seed (paired) before it is averaged: the
seed-to-seed spread of AP is several points here, the paired spread much smaller.
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

SETTING_KEYS = ("tile", "canvas", "grid", "num_classes", "steps", "batch_size", "lr", "split")
CE, FOCAL = 0, 3  # ROWS indices in bench/ablation.py: alpha-CE and focal gamma 2, alpha .25


def setting_of(result: dict) -> tuple:
    s = result["settings"]
    defaults = {"canvas": s.get("tile"), "num_classes": 3, "split": "test"}
    return tuple(s.get(k, defaults.get(k)) for k in SETTING_KEYS)


def collect(results: list[dict]) -> dict:
    """{setting: {"anchors": ..., "rows": {row index: {"name", "paper_AP", "runs": {seed: run}}}}}"""
    grouped: dict = defaultdict(lambda: {"anchors": None, "rows": {}})
    for result in results:
        group = grouped[setting_of(result)]
        anchors, classes = result["anchors"], setting_of(result)[SETTING_KEYS.index("num_classes")]
        ratio = anchors["negative"] / anchors["positive"]
        group["anchors"] = {"negatives_per_positive": ratio,
                            "negative_terms_per_positive": ratio * classes + classes - 1, **anchors}
        for row in result["rows"]:
            entry = group["rows"].setdefault(row["row"], {"name": row["name"], "paper_AP": row["paper_AP"], "runs": {}})
            entry["runs"].update({run["seed"]: run for run in row["runs"]})
    return dict(grouped)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(rows: dict, a: int, b: int, key: str = "AP") -> list[float]:
    """Per-seed differences row a minus row b over the seeds both ran."""
    seeds = sorted(set(rows[a]["runs"]) & set(rows[b]["runs"])) if a in rows and b in rows else []
    return [rows[a]["runs"][s][key] - rows[b]["runs"][s][key] for s in seeds]


def fmt(values: list[float]) -> str:
    mean, std = mean_std([v * 100 for v in values])
    return f"{mean:.1f} ± {std:.1f}"


def describe(setting: tuple) -> str:
    s = dict(zip(SETTING_KEYS, setting))
    return (f"{s['canvas'] * s['grid']} px images, objects at {s['tile']} px scale, {s['num_classes']} classes, "
            f"{s['steps']} steps of {s['batch_size']}, lr {s['lr']}, {s['split']} split")


def table(setting: tuple, group: dict) -> str:
    anchors = group["anchors"]
    lines = [f"### {describe(setting)}", "",
             f"{anchors['anchors_per_image']} anchors per image, {anchors['objects_per_image']} objects, "
             f"{anchors['negatives_per_positive']:.0f} negative anchors per positive, "
             f"{anchors['negative_terms_per_positive']:.0f} negative terms (anchor x class) per positive.", "",
             "| row | seeds | AP | AP50 | AP75 | minus alpha-CE, paired (AP) | diverged | paper AP |",
             "|---|---|---|---|---|---|---|---|"]
    rows = group["rows"]
    for index in sorted(rows):
        row, runs = rows[index], list(rows[index]["runs"].values())
        diff = paired(rows, index, CE) if index != CE else []
        paper = "diverges (no number)" if row["paper_AP"] is None else f"{row['paper_AP']}"
        diverged = sum(r["diverged"] is not None for r in runs)
        lines.append(f"| {row['name']} | {len(runs)} | {fmt([r['AP'] for r in runs])} | "
                     f"{fmt([r['AP50'] for r in runs])} | {fmt([r['AP75'] for r in runs])} | "
                     f"{fmt(diff) if diff else ''} | {diverged}/{len(runs)} | {paper} |")
    return "\n".join(lines)


def curve(grouped: dict, vary: str, fixed: dict) -> list[tuple]:
    """(x, setting, group) for the settings that differ from `fixed` only in `vary`, sorted by x."""
    points = []
    for setting, group in grouped.items():
        s = dict(zip(SETTING_KEYS, setting))
        if all(s[k] == v for k, v in fixed.items() if k != vary) and CE in group["rows"] and FOCAL in group["rows"]:
            x = group["anchors"]["negative_terms_per_positive"] if vary == "imbalance" else s[vary]
            points.append((x, setting, group))
    return sorted(points, key=lambda p: p[0])


def plot(grouped: dict, base: tuple, prefix: str) -> list[str]:
    """AP by gamma at the base setting; focal gamma 2 and alpha-CE against imbalance and against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = grouped[base]["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    gammas = {0: 0.0, 1: 0.5, 2: 1.0, 3: 2.0, 4: 5.0}
    curve_rows = [(g, rows[i]) for i, g in gammas.items() if i in rows]
    stats = [mean_std([r["AP"] * 100 for r in row["runs"].values()]) for _, row in curve_rows]
    ax.errorbar([g for g, _ in curve_rows], [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                label="focal loss (gamma 0: alpha-CE)")
    for index, colour in ((5, "tab:orange"), (6, "tab:red"), (7, "tab:gray"), (8, "black")):
        if index in rows:
            ax.axhline(statistics.fmean(r["AP"] * 100 for r in rows[index]["runs"].values()), color=colour,
                       linestyle="--", label=rows[index]["name"])
    ax.set(xlabel="gamma", ylabel="AP (%)", title=describe(base))
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    written.append(f"{prefix}-gamma.png")
    fig.savefig(written[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)
    fixed = dict(zip(SETTING_KEYS, base))
    for vary, label, log in (("imbalance", "negative terms (anchor x class) per positive", True),
                             ("steps", "training steps", True)):
        points = curve(grouped, vary, {k: v for k, v in fixed.items()
                                       if not (vary == "imbalance" and k in ("canvas", "num_classes"))})
        if len(points) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for index, colour in ((CE, "tab:blue"), (FOCAL, "tab:green")):
            ys = [mean_std([r["AP"] * 100 for r in g["rows"][index]["runs"].values()]) for _, _, g in points]
            ax.errorbar([x for x, _, _ in points], [m for m, _ in ys], yerr=[s for _, s in ys], marker="o", capsize=3,
                        color=colour, label=points[0][2]["rows"][index]["name"])
        ax.set(xlabel=label, ylabel="AP (%, mean ± std over seeds)")
        if log:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(f"{prefix}-{vary}.png")
        fig.savefig(written[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="bench/ablation.py result files")
    parser.add_argument("--plots", help="path prefix for PNG plots (e.g. bench/results/ablation); none if omitted")
    args = parser.parse_args()
    grouped = collect([json.load(open(path)) for path in args.results])
    for setting in sorted(grouped, key=lambda s: tuple(str(v) for v in s)):
        print(table(setting, grouped[setting]), end="\n\n")
    if args.plots:
        base = max(grouped, key=lambda s: len(grouped[s]["rows"]))  # the Table 1 setting: the most rows
        for path in plot(grouped, base, args.plots):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
