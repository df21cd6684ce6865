"""Plots and traces (the data they draw, and that the PNGs are real images), and the
entropy_traces notebook executed headless on a small generated run (real tools and
tokenizer; seeded synthetic entropies)."""
import json
import math
import os
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from tepo_jax.analysis import pilot, plots, traces
from tepo_jax.rollout.trajectory import (TokenKind, entropy_deltas, model_mask,
                                         segment_entropies)

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "entropy_traces.ipynb"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """runs/demo/{tepo_sparse,grpo}/ laid out as `make demo` writes them (through the
    driver's RunLog), from the real tools and tokenizer."""
    from tepo_jax.analysis import examples as ex
    d = tmp_path_factory.mktemp("nb")
    exs, corpus = ex.synthetic_examples(n_math=2, n_qa=2, seed=5)
    tok, bridge = ex.tools_and_tokenizer(d / "work", exs, corpus)
    try:
        trajs = ex.build_trajectories(exs, tok, bridge, seed=5, redundant_rate=0.5)
    finally:
        bridge.close()
    runs = d / "runs" / "demo"
    for i, algo in enumerate(("tepo_sparse", "grpo")):
        ex.write_run(runs / algo, trajs, steps=3, seed=i)
    return runs


def assert_png(path, min_w=400, min_h=200):
    path = Path(path)
    assert path.stat().st_size > 10_000
    img = matplotlib.image.imread(path)
    h, w = img.shape[:2]
    assert w >= min_w and h >= min_h
    rgb = img[..., :3].reshape(-1, 3)
    assert len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 50   # not a blank canvas
    return w, h


def test_run_has_the_driver_layout_and_phases_are_kept_apart(demo_run):
    d = demo_run / "tepo_sparse" / "trajectories"
    assert sorted(f.name for f in d.iterdir()) == [
        "eval_000000.jsonl", "eval_000003.jsonl", "rl_000001.jsonl", "rl_000002.jsonl",
        "rl_000003.jsonl", "sft_data.jsonl"]
    assert [f.name for f in pilot.trajectory_files(d)] == [f"rl_00000{i}.jsonl" for i in (1, 2, 3)]
    assert [f.name for f in pilot.trajectory_files(d, phase="eval")] == [
        "eval_000000.jsonl", "eval_000003.jsonl"]
    assert len(pilot.trajectory_files(d, phase="all")) == 6
    assert [f.name for f in pilot.trajectory_files(d, last=1)] == ["rl_000003.jsonl"]
    n = len(pilot.load_trajectories(d / "sft_data.jsonl"))
    assert len(pilot.load_trajectories(d)) == 3 * n                   # rl only
    assert not pilot.load_trajectories(d, phase="sft")[0].entropies.any()   # SFT: no entropies
    rows = traces.read_metrics(demo_run / "tepo_sparse" / "metrics.jsonl", phase=None)
    assert [(r["phase"], r["step"]) for r in rows] == [
        ("eval", 0), ("rl", 1), ("rl", 2), ("rl", 3), ("eval", 3)]
    assert "eval/f1" in rows[0] and "reward/f1" in rows[1]            # the driver's names


def test_entropy_trace_plots_the_trajectory_data(demo_run, tmp_path):
    trajs = pilot.load_trajectories(demo_run / "tepo_sparse" / "trajectories", last=1)
    i = traces.pick_trajectory(trajs)
    traj = trajs[i]
    assert traj.num_calls == max(t.num_calls for t in trajs)
    fig, tr = plots.plot_entropy_trace(traj, tmp_path / "trace.png")
    assert_png(tmp_path / "trace.png", min_w=800)
    n_prompt = int(np.sum(traj.kinds == TokenKind.PROMPT))
    np.testing.assert_array_equal(tr.positions, np.arange(n_prompt, len(traj)))
    model = model_mask(traj.kinds)[n_prompt:]
    np.testing.assert_allclose(tr.entropy[model], traj.entropies[n_prompt:][model])
    assert np.isnan(tr.entropy[~model]).all()
    np.testing.assert_allclose([s.mean for s in tr.segments],
                               [h for h in segment_entropies(traj) if not math.isnan(h)])
    np.testing.assert_allclose(tr.deltas, entropy_deltas(traj))
    calls = [(s.start, s.end) for s in tr.spans if s.kind == "call"]
    assert calls == [c.call_span for c in traj.tool_calls]
    assert [s.tool for s in tr.spans if s.kind == "result"] == [c.name for c in traj.tool_calls]
    ax = fig.axes[0]
    assert sum("ΔH" in t.get_text() for t in ax.texts) == traj.num_calls


def test_dh_distributions(demo_run, tmp_path):
    labels = pilot.label_calls(pilot.load_trajectories(demo_run / "grpo" / "trajectories"))
    fig, groups = plots.plot_dh_distributions(labels, tmp_path / "dh.png")
    assert_png(tmp_path / "dh.png", min_w=1000)
    for tool in {lb.tool for lb in labels}:
        np.testing.assert_allclose(groups["tool"][tool], [lb.dh for lb in labels if lb.tool == tool])
    assert sum(v.size for v in groups["quality"].values()) == len(labels)
    assert set(groups["quality"]) == {"high", "low"}        # the faulty calls are low
    # empty input still draws (a message instead of violins)
    plots.plot_dh_distributions([], tmp_path / "empty.png")


def write_metrics(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_training_curves_series_and_png(tmp_path):
    a = write_metrics(tmp_path / "runs" / "tepo_sparse" / "metrics.jsonl", [
        {"step": 0, "phase": "sft", "reward/f1": 9.0},
        {"step": 0, "phase": "rl", "reward/f1": 0.1, "tepo/calls_per_traj": 2.0,
         "tepo/dh_mean": -0.1, "tepo/frac_reducing": 0.5},
        {"step": 1, "phase": "rl", "reward/f1": 0.3, "tepo/calls_per_traj": 1.5,
         "tepo/dh_mean": None, "tepo/frac_reducing": 0.6},
        {"step": 1, "phase": "rl", "reward/f1": 0.4, "tepo/calls_per_traj": 1.4,
         "tepo/dh_mean": -0.2, "tepo/frac_reducing": 0.7},      # re-logged after a resume
        {"step": 2, "phase": "eval", "reward/f1": 0.5},
    ])
    b = write_metrics(tmp_path / "runs" / "grpo" / "metrics.jsonl", [
        {"step": s, "reward/score": 0.1 * s, "tepo/calls_per_traj": 3.0} for s in range(4)] + [
        {"step": 3, "phase": "eval", "eval/f1": 0.6, "eval/tepo/dh_mean": -0.3}])  # driver names
    out = tmp_path / "curves.png"
    series = plots.plot_training_curves({"tepo_sparse": a, "grpo": b}, out)
    assert_png(out, min_w=800, min_h=400)
    steps, values = series["reward/f1"]["tepo_sparse"]
    assert steps.tolist() == [0, 1] and values.tolist() == [0.1, 0.4]       # no sft rows
    assert series["reward/f1"]["grpo"][1] == pytest.approx([0, 0.1, 0.2, 0.3])   # fallback
    assert series["reward/f1"]["tepo_sparse (eval)"][1].tolist() == [0.5]
    assert series["reward/f1"]["grpo (eval)"][1].tolist() == [0.6]            # eval/f1
    assert series["tepo/dh_mean"]["grpo (eval)"][1].tolist() == [-0.3]       # eval/tepo/dh_mean
    assert series["tepo/dh_mean"]["tepo_sparse"][1].tolist() == [-0.1, -0.2]
    assert "grpo" not in series["tepo/dh_mean"] and "grpo" not in series["tepo/frac_reducing"]
    assert series["tepo/calls_per_traj"]["grpo"][0].tolist() == [0, 1, 2, 3]
    # discovery: a directory of runs, a run directory, label=path
    assert traces.discover_metrics(tmp_path / "runs") == {"grpo": b, "tepo_sparse": a}
    assert traces.discover_metrics(f"mine={a.parent},{b}") == {"mine": a, "grpo": b}
    with pytest.raises(FileNotFoundError, match="nothing"):   # a typo is said, not an empty plot
        traces.discover_metrics(tmp_path / "nothing")


def test_read_metrics_names_bad_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 0, "phase": "rl"}\nnot json\n')
    with pytest.raises(ValueError, match="m.jsonl:2"):
        traces.read_metrics(p)


def test_smooth():
    np.testing.assert_allclose(traces.smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1, 2, 4, 6])


# ----------------------------------------------------------------------------- the notebook


def test_notebook_executes_headless(demo_run, tmp_path, monkeypatch):
    import nbformat
    from ipykernel.kernelspec import install
    from nbclient import NotebookClient

    # A 'python3' kernelspec pointing at this interpreter, found before any system one.
    install(user=False, prefix=str(tmp_path / "jupyter"), kernel_name="python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    kernel_json = json.loads((tmp_path / "jupyter" / "share" / "jupyter" / "kernels" / "python3"
                              / "kernel.json").read_text())
    assert kernel_json["argv"][0] == sys.executable
    monkeypatch.setenv("TEPO_TRACES", str(demo_run / "tepo_sparse" / "trajectories"))
    monkeypatch.setenv("TEPO_METRICS", str(demo_run))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()       # raises CellExecutionError if any cell errors
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3      # trace, ΔH distributions, training curves
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "3 rl trajectory file(s)" in text and "point-biserial" in text
    assert "'grpo'" in text and "'tepo_sparse'" in text
