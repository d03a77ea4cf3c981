"""What a reader sees in the deactivation plots: a title naming the model and set, the random band in
the legend with its seed count, no axis below zero for a rate."""

from __future__ import annotations

import pandas as pd

from safety_neurons import report


def test_deactivation_plot_titles_legend_and_axes(tmp_path, monkeypatch):
    seen = []

    def record(fig, path):
        ax = fig.axes[0]
        seen.append((path.name, ax.get_title(), [t.get_text() for t in ax.get_legend().get_texts()],
                     ax.get_ylim()))
        return path

    monkeypatch.setattr(report, "_save", record)
    df = pd.DataFrame([
        {"n": 0, "baseline": "safety", "set": "exact", "split": "all", "asr": 0.0, "breaks_model": False,
         "nll_ratio": 1.0},
        {"n": 10, "baseline": "safety", "set": "exact", "split": "all", "asr": 0.5, "breaks_model": True,
         "nll_ratio": 3.0},
        {"n": 10, "baseline": "random", "set": "exact", "split": "all", "asr": 0.1, "asr_min": 0.0,
         "asr_max": 0.2, "seeds": 3, "breaks_model": False, "nll_ratio": 1.1},
        {"n": 30, "baseline": "random", "set": "exact", "split": "all", "asr": 0.1, "asr_min": 0.0,
         "asr_max": 0.3, "seeds": 3, "breaks_model": False, "nll_ratio": 1.2}])
    report.plot_deactivation(df, tmp_path, "tiny, set exact")
    (count, c_title, c_legend, c_ylim), (util, u_title, _, u_ylim) = seen
    assert (count, util) == ("asr_vs_count.png", "asr_vs_utility.png")
    assert c_title == "tiny, set exact: attack success vs neurons switched off"
    assert u_title.startswith("tiny, set exact: attack success vs utility")
    assert "random, min-max of 3 seeds (exact all)" in c_legend and "random, mean (exact all)" in c_legend
    assert "breaks the model" in c_legend
    assert c_ylim[0] == 0 and u_ylim[0] == 0
    seen.clear()
    report.plot_deactivation(df.assign(model="smollm2"), tmp_path)  # from a report: the rows' model
    assert seen[0][1].startswith("smollm2: ")
