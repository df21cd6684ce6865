"""Matplotlib figures for entropy traces, ΔH distributions and training curves.

Figures are built with `matplotlib.figure.Figure` on the Agg canvas, never through pyplot,
so nothing here touches global backend state: it works in a headless driver, in threads
and in notebooks (display with `IPython.display.Image(figure_png(fig))`). Every function
returns the data it drew, so tests and notebooks can check the numbers, not only the PNG.
"""
from __future__ import annotations

import io
import math
import os
from collections import defaultdict
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from tepo_jax import paths
from tepo_jax.analysis.traces import (entropy_trace, metric_series, read_metrics, smooth,
                                      EntropyTrace)
from tepo_jax.rollout.trajectory import Trajectory

TOOL_COLOURS = {"python": "tab:orange", "search": "tab:green"}
_EXTRA_COLOURS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
RESULT_HATCH = "///"

# (metric key, alternatives when a run lacks it, panel title)
DEFAULT_CURVES = (
    ("reward/f1", ("reward/score",), "reward (F1)"),
    ("tepo/calls_per_traj", (), "tool calls per trajectory"),
    ("tepo/dh_mean", (), "mean ΔH per call"),
    ("tepo/frac_reducing", (), "fraction of calls with ΔH < 0"),
)


def new_figure(width: float = 10, height: float = 4, nrows: int = 1, ncols: int = 1):
    """(Figure on an Agg canvas, array of axes)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_png(fig: Figure, path: str | os.PathLike, dpi: int = 110):
    """Write the figure as a PNG to `path` (a local path or a URL, e.g. gs://.../plot.png)."""
    path = paths.as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_png(fig, dpi))
    return path


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    return buf.getvalue()


def tool_colour(tool: str) -> str:
    if tool not in TOOL_COLOURS:
        TOOL_COLOURS[tool] = _EXTRA_COLOURS[(len(TOOL_COLOURS) - 2) % len(_EXTRA_COLOURS)]
    return TOOL_COLOURS[tool]


# ----------------------------------------------------------------------------- entropy trace


def draw_entropy_trace(ax, tr: EntropyTrace, title: str | None = None) -> None:
    """Per-token entropy, calls (solid) and results (hatched) shaded per tool, H(r_k) as
    horizontal lines, ΔH_k annotated above r_k (green: reducing, red: not)."""
    ax.plot(tr.positions, tr.entropy, lw=0.9, color="tab:blue", marker=".", ms=2,
            label="token entropy $H_t$")
    legend = {}
    for s in tr.spans:
        colour = tool_colour(s.tool)
        if s.kind == "call":
            ax.axvspan(s.start - 0.5, s.end - 0.5, color=colour, alpha=0.30, lw=0)
            legend[f"{s.tool} call"] = Patch(color=colour, alpha=0.30)
        else:
            ax.axvspan(s.start - 0.5, s.end - 0.5, facecolor=colour, alpha=0.12,
                       hatch=RESULT_HATCH, edgecolor=colour, lw=0)
            legend[f"{s.tool} result"] = Patch(facecolor=colour, alpha=0.12,
                                                hatch=RESULT_HATCH, edgecolor=colour)
    finite = tr.entropy[np.isfinite(tr.entropy)]
    top = float(finite.max()) if finite.size else 1.0
    for seg in tr.segments:
        ax.hlines(seg.mean, seg.start - 0.5, seg.end - 0.5, colors="black", lw=1.8,
                  linestyles="--")
        ax.text(seg.start, seg.mean, f" $H(r_{{{seg.turn}}})$={seg.mean:.2f}", fontsize=7,
                va="bottom")
    by_turn = {seg.turn: seg for seg in tr.segments}
    for k, dh in enumerate(tr.deltas, start=1):
        x = by_turn[k].start if k in by_turn else next(
            (s.end for s in tr.spans if s.turn == k), tr.positions[-1])
        txt = "ΔH undefined" if math.isnan(dh) else f"ΔH$_{k}$={dh:+.3f}"
        colour = "grey" if math.isnan(dh) else ("tab:green" if dh < 0 else "tab:red")
        ax.annotate(txt, (x, top * 1.04), fontsize=8, color=colour, ha="left",
                    annotation_clip=False)
    ax.set_ylim(0, top * 1.15 + 1e-6)
    ax.set_xlabel("token position")
    ax.set_ylabel("entropy (nats)")
    if title:
        ax.set_title(title, fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles + list(legend.values()), labels + list(legend), fontsize=7,
              loc="upper left", bbox_to_anchor=(1.005, 1.0))


def plot_entropy_trace(traj: Trajectory, out_png: str | os.PathLike | None = None,
                       title: str | None = None, include_prompt: bool = False):
    """Figure of one trajectory's entropy trace; returns (fig, EntropyTrace)."""
    tr = entropy_trace(traj, include_prompt=include_prompt)
    fig, axes = new_figure(max(8.0, min(20.0, len(tr.positions) / 25)), 4)
    title = title or (f"{traj.prompt_id} (sample {traj.sample_index}, {traj.num_calls} calls, "
                      f"reward {traj.reward if traj.reward is not None else 'n/a'})")
    draw_entropy_trace(axes[0, 0], tr, title)
    if out_png:
        save_png(fig, out_png)
    return fig, tr


# ----------------------------------------------------------------------------- ΔH distributions


def dh_groups(labels: Sequence) -> dict[str, dict[str, np.ndarray]]:
    """{'tool': {tool: ΔH[]}, 'quality': {'high'|'low': ΔH[]}, 'tool_quality': {'tool/q': ΔH[]}}
    over the calls (pilot CallLabels) with a defined ΔH; a multi-call turn is in the group of
    each of its tools."""
    out = {"tool": defaultdict(list), "quality": defaultdict(list),
           "tool_quality": defaultdict(list)}
    for lb in labels:
        if math.isnan(lb.dh):
            continue
        q = "high" if lb.high else "low"
        out["quality"][q].append(lb.dh)
        for tool in lb.tools:
            out["tool"][tool].append(lb.dh)
            out["tool_quality"][f"{tool}/{q}"].append(lb.dh)
    return {name: {k: np.asarray(v[k], np.float64) for k in sorted(v)}
            for name, v in out.items()}


def draw_violins(ax, groups: Mapping[str, np.ndarray], title: str) -> None:
    """Violins (groups with >= 2 values) with every value jittered on top, n in the tick."""
    names = [n for n in groups if groups[n].size]
    if not names:
        ax.text(0.5, 0.5, "no calls with a defined ΔH", ha="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        return
    rng = np.random.default_rng(0)
    multi = [i for i, n in enumerate(names) if groups[n].size >= 2 and np.ptp(groups[n]) > 0]
    if multi:
        ax.violinplot([groups[names[i]] for i in multi], positions=multi, showmeans=True,
                      widths=0.8)
    for i, n in enumerate(names):
        v = groups[n]
        colour = tool_colour(n.split("/")[0]) if n.split("/")[0] in TOOL_COLOURS else \
            {"high": "tab:green", "low": "tab:red"}.get(n, "tab:blue")
        ax.scatter(i + rng.uniform(-0.15, 0.15, v.size), v, s=6, alpha=0.6, color=colour)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)), [f"{n}\n(n={groups[n].size})" for n in names],
                  fontsize=8)
    ax.set_ylabel("ΔH")
    ax.set_title(title, fontsize=10)


def plot_dh_distributions(labels: Sequence, out_png: str | os.PathLike | None = None):
    """ΔH by tool, by quality and by tool×quality (violins), plus overlaid histograms by
    quality. Returns (fig, dh_groups(labels))."""
    groups = dh_groups(labels)
    fig, axes = new_figure(14, 4, 1, 4)
    draw_violins(axes[0, 0], groups["tool"], "ΔH by tool")
    draw_violins(axes[0, 1], groups["quality"], "ΔH by call quality")
    draw_violins(axes[0, 2], groups["tool_quality"], "ΔH by tool and quality")
    ax = axes[0, 3]
    allv = np.concatenate(list(groups["quality"].values()) or [np.zeros(0)])
    if allv.size:
        bins = np.histogram_bin_edges(allv, bins=min(30, max(5, allv.size // 3)))
        for q, colour in (("high", "tab:green"), ("low", "tab:red")):
            if q in groups["quality"]:
                ax.hist(groups["quality"][q], bins=bins, alpha=0.5, color=colour,
                        label=f"{q} quality", density=True)
        ax.axvline(0, color="black", lw=0.8)
        ax.legend(fontsize=8)
    ax.set_xlabel("ΔH")
    ax.set_title("ΔH histogram by quality", fontsize=10)
    if out_png:
        save_png(fig, out_png)
    return fig, groups


CLASS_COLOURS = {"useful": "tab:green", "redundant": "tab:orange", "useless": "tab:red"}


def plot_dh_by_class(labels: Sequence, report, out_png: str | os.PathLike | None = None):
    """ΔH of every call by quality class (pilot `CallLabel.quality_class`), jittered, with
    the class mean and its interval from `report.by_class` (no bar where the class is too
    small for one). Returns (fig, {class: ΔH[]})."""
    groups = {c: np.array([lb.dh for lb in labels if lb.quality_class == c and not math.isnan(lb.dh)])
              for c in report.by_class}
    fig, axes = new_figure(7, 4)
    ax, rng = axes[0, 0], np.random.default_rng(0)
    for i, (name, dh) in enumerate(groups.items()):
        colour = CLASS_COLOURS.get(name, "tab:blue")
        ax.scatter(i + rng.uniform(-0.2, 0.2, dh.size), dh, s=5, alpha=0.35, color=colour)
        st = report.by_class[name]
        if st["n"]:
            has_ci = not math.isnan(st["dh_lo"])
            err = [[st["dh_mean"] - st["dh_lo"]], [st["dh_hi"] - st["dh_mean"]]] if has_ci else None
            ax.errorbar([i + 0.32], [st["dh_mean"]], yerr=err, fmt="D", color="black", capsize=4, ms=5)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(groups)), [f"{n}\n(n={groups[n].size})" for n in groups])
    ax.set_ylabel("ΔH = H(r_k) − H(r_{k−1})")
    ax.set_title(f"ΔH by call quality: mean and {report.level:.0%} CI (diamonds)", fontsize=10)
    if out_png:
        save_png(fig, out_png)
    return fig, groups


# ----------------------------------------------------------------------------- training curves


def phase_keys(key: str, phase: str) -> tuple[str, ...]:
    """The names `key` may have in rows of `phase`: the driver logs eval metrics as
    `eval/<name>` (`rl_loop.eval_metrics`: `reward/f1` -> `eval/f1`, `tepo/dh_mean` ->
    `eval/tepo/dh_mean`)."""
    if phase != "eval":
        return (key,)
    return (key, f"eval/{key}", f"eval/{key.split('/', 1)[-1]}")


def training_series(metrics_files: Mapping[str, str | os.PathLike], curves=DEFAULT_CURVES,
                    phase: str = "rl") -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """{metric key: {run label: (steps, values)}} for each curve (the first of the key and
    its alternatives that the run has); runs lacking all of them are left out of that key."""
    rows = {label: read_metrics(path, phase=phase) for label, path in metrics_files.items()}
    out: dict[str, dict] = {}
    for key, alternatives, _ in curves:
        out[key] = {}
        names = [k for name in (key, *alternatives) for k in phase_keys(name, phase)]
        for label, rs in rows.items():
            for k in names:
                steps, values = metric_series(rs, k)
                if steps.size:
                    out[key][label] = (steps, values)
                    break
    return out


def training_curves_figure(metrics_files: Mapping[str, str | os.PathLike], *,
                           curves=DEFAULT_CURVES, phase: str = "rl",
                           eval_phase: str | None = "eval", smooth_window: int = 1,
                           title: str | None = None):
    """(fig, series) of `plot_training_curves`, without writing a file."""
    series = training_series(metrics_files, curves, phase)
    if eval_phase:
        for key, runs in training_series(metrics_files, curves, eval_phase).items():
            series[key].update({f"{label} (eval)": s for label, s in runs.items()})
    ncols = min(len(curves), 2)
    nrows = math.ceil(len(curves) / ncols)
    fig, axes = new_figure(6 * ncols, 3.4 * nrows, nrows, ncols)
    colours = {label: f"C{i}" for i, label in enumerate(metrics_files)}
    for ax, (key, _, panel_title) in zip(axes.ravel(), curves):
        _draw_curves(ax, key, panel_title, series[key], colours, smooth_window)
    for ax in axes.ravel()[len(curves):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig, series


def _draw_curves(ax, key, panel_title, runs, colours, smooth_window):
    for label, (steps, values) in runs.items():
        is_eval = label.endswith(" (eval)")
        colour = colours.get(label[:-len(" (eval)")] if is_eval else label, "C9")
        ax.plot(steps, values if is_eval else smooth(values, smooth_window), color=colour,
                ls="--" if is_eval else "-",
                marker="o" if is_eval or steps.size < 20 else None, ms=3, label=label)
    if runs:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, f"no '{key}' in the metrics", ha="center", transform=ax.transAxes)
    if key == "tepo/dh_mean":
        ax.axhline(0, color="black", lw=0.6)
    ax.set_title(panel_title, fontsize=10)
    ax.set_xlabel("step")


def plot_training_curves(metrics_files: Mapping[str, str | os.PathLike],
                         out_png: str | os.PathLike | None, **kwargs):
    """Training curves, one line per run (label -> metrics.jsonl), one panel per metric:
    reward (reward/f1, else reward/score), tool calls per trajectory, ΔH mean and fraction
    of entropy-reducing calls vs step, from the 'rl' rows; 'eval' rows of the same metrics
    are drawn dashed with markers. Writes `out_png` (when given) and returns the plotted
    series {metric key: {label: (steps, values)}} (unsmoothed; eval under 'label (eval)').
    kwargs: curves, phase, eval_phase, smooth_window, title (see training_curves_figure)."""
    fig, series = training_curves_figure(metrics_files, **kwargs)
    if out_png:
        save_png(fig, out_png)
    return series
