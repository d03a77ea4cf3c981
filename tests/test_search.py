"""stage=search on a tiny llama: the Optuna study in the run folder, its resumption, its Pareto front
(recounted by brute force), a picked trial as a set, and a trial's numbers equal to the deactivation
(or tuning) stage run with what it drew."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from safety_neurons.cfg import compose
from safety_neurons.errors import UserError
from safety_neurons.neurons import NeuronSet
from safety_neurons.stages import get_stage
from safety_neurons.stages.search import kinds_of
from tests.builders import stage_overrides

pytest.importorskip("optuna")


@pytest.fixture(scope="module")
def detected(fixtures, tmp_path_factory):
    run = tmp_path_factory.mktemp("detect")
    get_stage("detect")(compose(stage_overrides(fixtures, run / "d", "stage=detect", "topk.consistency=0.25")))
    return fixtures


def search(fx, run, *extra):
    return get_stage("search")(compose(stage_overrides(fx, run, "stage=search", *extra)))


def non_dominated(df: pd.DataFrame, up: str, down: str) -> set[int]:
    """Trials no other trial beats on one objective without losing on the other (brute force)."""
    out = set()
    for _, t in df.iterrows():
        beaten = any((u[up] >= t[up] and u[down] <= t[down]) and (u[up] > t[up] or u[down] < t[down])
                     for _, u in df.iterrows())
        if not beaten:
            out.add(int(t["trial"]))
    return out


def test_a_study_resumes_its_pareto_front_is_exact_and_a_pick_is_the_trials_set(detected, tmp_path):
    run = tmp_path / "s"
    space = ["search.trials=4", "search.kinds=[all,attn,ffn,q+k]", "search.ablations=[zero]"]
    res = search(detected, run, *space)
    assert res["trials"] == 4 and res["new_trials"] == 4 and (run / "study.journal").exists()
    first = pd.read_csv(run / "trials.csv")
    assert list(first["trial"]) == [0, 1, 2, 3]
    with pytest.raises(UserError, match="already exists.*search.resume=true"):
        search(detected, run, *space)
    with pytest.raises(UserError, match="searched another space.*search.kinds"):
        search(detected, run, "search.resume=true", "search.trials=6", "search.kinds=[ffn]", "search.ablations=[zero]")
    res = search(detected, run, "search.resume=true", *space[1:], "search.trials=6")
    assert res["trials"] == 6 and res["new_trials"] == 2
    df = pd.read_csv(run / "trials.csv")
    assert list(df["trial"]) == list(range(6))
    pd.testing.assert_frame_equal(df.head(4)[first.columns], first)  # the first trials are kept as they were
    front = non_dominated(df, "objective_asr_coherent", "objective_kl")
    assert set(pd.read_csv(run / "pareto.csv")["trial"]) == front == set(res["pareto_trials"])
    assert set(df.loc[df["pareto"], "trial"]) == front and (run / "pareto.png").stat().st_size > 0

    # pick: the trial's neurons, recounted from the set by its drawn kinds, layer scope and count
    t = df.iloc[-1]
    picked = get_stage("search")(compose(stage_overrides(detected, run, "stage=search", f"search.pick={int(t.trial)}",
                                                         *space)))
    full = NeuronSet.load(detected["store"] / "neurons" / "local" / "harmbench" / "exact")
    kinds = kinds_of(t["kinds"])
    part = [n for n in full.ranking if n[1] in kinds]
    if t["per_layer"]:
        want, per = [], {}
        for n in part:
            per[n[0]] = per.get(n[0], 0) + 1
            if per[n[0]] <= int(t["n_per_layer"]):
                want.append(n)
    else:
        want = part[: int(t["n"])]
    got = json.loads(open(picked["neurons_json"]).read())
    assert [tuple(n) for n in got["ranking"]] == [tuple(n) for n in want] and picked["n_neurons"] == t["n_neurons"]
    assert got["meta"]["search"]["trial"] == int(t.trial)

    # the trial measured what the deactivation stage measures for that set
    dres = get_stage("deactivate")(compose(stage_overrides(detected, tmp_path / "d", "stage=deactivate",
                                                           f"deactivate.neurons={picked['tag']}", "deactivate.n=all")))
    for k in ("asr", "asr_coherent", "kl", "over_refusal", "utility_nll"):
        assert dres[k] == pytest.approx(t[k], abs=1e-9), k
    with pytest.raises(UserError, match="has no finished trial 99"):
        get_stage("search")(compose(stage_overrides(detected, run, "stage=search", "search.pick=99", *space)))


def test_a_tuning_search_scores_what_finetune_measures(detected, tmp_path, capsys):
    run = tmp_path / "t"
    res = search(detected, run, "search.target=finetune", "search.trials=2", "search.lr=[1e-3,1e-2]",
                 "search.top_n=[2,20]", "search.steps=[1,3]", "finetune.n_harmful=2", "finetune.n_harmless=2",
                 "finetune.max_new_tokens_distill=2", "finetune.batch_size=2")
    assert res["trials"] == 2 and res["objectives"] == ["harmful_refusal", "over_refusal", "nll_ratio"]
    df = pd.read_csv(run / "trials.csv")
    t = df.iloc[0]
    picked = get_stage("search")(compose(stage_overrides(detected, run, "stage=search", "search.target=finetune",
                                                         "search.pick=0", "search.lr=[1e-3,1e-2]", "search.top_n=[2,20]",
                                                         "search.steps=[1,3]")))
    assert picked["overrides"][1:] == [f"finetune.top_n={int(t.top_n)}", f"finetune.steps={int(t.steps)}"]
    fres = get_stage("finetune")(compose(stage_overrides(
        detected, tmp_path / "f", "stage=finetune", *picked["overrides"], "finetune.n_harmful=2", "finetune.n_harmless=2",
        "finetune.max_new_tokens_distill=2", "finetune.batch_size=2", "finetune.save_as=from-search")))
    for k in ("harmful_refusal", "over_refusal", "utility_nll", "kl"):
        assert fres[f"after_{k}"] == pytest.approx(t[k], abs=1e-6), k


@pytest.mark.parametrize("over, msg", [
    (["search.trials=0"], "search.trials=0 must be at least 1"),
    (["search.regions=[middle]"], "search.regions=['middle'] must be a non-empty list of all, under, reason, gen"),
    (["search.kinds=[mlp]"], "search.kinds has 'mlp'"),
    (["search.target=finetune", "search.lr=[0.1,0.01]"], r"search.lr=\[0.1, 0.01\] must be a range"),
    (["search.resume=true"], "there is no study at"),
])
def test_bad_search_settings_are_one_line(detected, tmp_path, over, msg):
    with pytest.raises(UserError, match=msg.replace("[", r"\[").replace("]", r"\]") if "\\" not in msg else msg):
        search(detected, tmp_path / "bad", *over)
