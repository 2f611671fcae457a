"""The benchmark harness (benchmark/run.py): its metrics, its prompt files and its quick mode.

The quick run checks that the harness works end to end and that the untouched toy model passes
its accuracy floor; it does not assert ACE's numbers (those come from the full run and are
reported, not tested).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from benchmark.metrics import frechet_distance, harmonic_overall
from benchmark.prompts import load_prompt_file, split_prompts
from runner.host import REPO
from toy import world


def test_harmonic_overall():
    assert harmonic_overall(0.0, 0.0, 1.0) == pytest.approx(1.0)
    assert harmonic_overall(1.0, 0.0, 1.0) == 0.0  # the concept is still there: nothing counts
    assert harmonic_overall(0.0, 0.0, 0.0) == 0.0  # everything else is gone
    assert harmonic_overall(0.5, 0.5, 0.5) == pytest.approx(0.5)
    assert harmonic_overall(0.125, 0.125, 1.0) == pytest.approx(3 / (2 / 0.875 + 1))


def test_frechet_distance_of_known_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = torch.tensor([1.0, 2.0, 0.0, 0.0])
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, abs=1e-6)  # same covariance: ‖Δμ‖²
    # N(0, I) against N(0, 4I) in 4 dimensions: tr(I + 4I − 2·2I) = 4
    b = torch.randn(20000, 4, generator=g) * 2
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)


def test_paired_fid_difference_tells_a_tie_from_a_gap():
    from benchmark.stats import fid_difference

    g = torch.Generator().manual_seed(0)
    reference = torch.randn(300, 4, generator=g)
    near = reference + 0.3 * torch.randn(300, 4, generator=g)  # the same pictures, slightly changed
    also_near = reference + 0.3 * torch.randn(300, 4, generator=g)
    far = reference + torch.tensor([1.5, 0.0, 0.0, 0.0])  # every picture moved
    tie = fid_difference(near, also_near, reference, draws=200)
    assert tie.low < 0 < tie.high and abs(tie.value) < 0.1
    gap = fid_difference(near, far, reference, draws=200)
    assert gap.value == pytest.approx(frechet_distance(near, reference) - frechet_distance(far, reference))
    assert gap.high < 0 and gap.value < -2  # ‖Δμ‖² = 2.25 against about 0.2
    with pytest.raises(ValueError, match="the same number of pictures, got 300, 299, 300"):
        fid_difference(near, far[:299], reference)


def test_scaling_table_shows_each_baselines_fid_against_aces():
    from benchmark.report import scaling_table

    share = {"value": 0.9, "low": 0.85, "high": 0.95, "n": 288}
    row = {"n_concepts": 10, "acc_e": share, "acc_g": share, "acc_s": share, "h_o": 0.8, "seconds": 2.0}
    table = scaling_table({"scaling": [
        dict(row, method="ace", fid_preserve=38.4),
        dict(row, method="uce", fid_preserve=65.6, fid_ace_minus_this={"value": -27.2, "low": -62.7, "high": -5.3, "n": 288}),
    ]})
    assert "FID: ACE minus this [95%]" in table[0]
    assert table[2].split(" | ")[6:8] == ["38.4", "—"]
    assert table[3].split(" | ")[6:8] == ["65.6", "-27.2 [-62.7, -5.3]"]


def test_prompt_files_are_checked(tmp_path):
    good = load_prompt_file()
    assert good["request"]["circle"] == ["circle"]
    cases = {
        "not json": ("{", "not valid JSON"),
        "no templates": (dict(good, templates=[]), "'templates' must be a non-empty list"),
        "template without {x}": (dict(good, templates=["a picture"]), "each with {x}"),
        "missing concept": (dict(good, left_out={k: v for k, v in good["left_out"].items() if k != "Brontel"}),
                            "'left_out' has no words for Brontel"),
        "empty words": (dict(good, request=dict(good["request"], circle=[])), "see circle"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        with pytest.raises(ValueError, match=message):
            load_prompt_file(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_prompt_file(tmp_path / "missing.json")


def test_another_prompt_file_changes_the_request_and_the_generality_prompts(comfy, tmp_path):
    from benchmark import run

    data = load_prompt_file()
    data["request"]["circle"] = ["disc", "orb"]
    data["left_out"]["circle"] = ["ball"]
    data["templates"] = ["a doodle of {a} {x}"]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    mine = load_prompt_file(path)

    request = run.make_request(["circle"], mine)
    assert [(c.target, c.synonyms) for c in request.concepts] == [("disc", ("orb",))]
    assert "square" in request.preserve and "disc" not in request.preserve
    texts = [p.text for p in split_prompts("object", "circle", "heldout", mine)]
    assert texts and all(t.startswith("a doodle of") for t in texts)
    left_out = [p.text.split() for p in split_prompts("object", "circle", "left_out", mine)]
    assert left_out and all("ball" in words and not {"circle", "disc", "orb"} & set(words) for words in left_out)


def test_wilson_and_bootstrap_intervals():
    from benchmark.stats import Judged, h_o_difference, h_o_interval, wilson, within_noise

    assert wilson(0, 10).low == 0 and 0.25 < wilson(0, 10).high < 0.35  # 0 of 10 is not a sure 0
    half = wilson(50, 100)
    assert half.value == 0.5 and half.low == pytest.approx(0.404, abs=0.002) and half.high == pytest.approx(0.596, abs=0.002)
    g = torch.Generator().manual_seed(1)
    judged = [Judged(erased=(torch.rand(24, generator=g) < 0.1).tolist(), general=(torch.rand(48, generator=g) < 0.3).tolist(),
                     kept=(torch.rand(216, generator=g) < 0.97).tolist()) for _ in range(4)]
    interval = h_o_interval(judged)
    assert interval.low < interval.value < interval.high and interval.high - interval.low < 0.2
    assert within_noise(h_o_difference(judged, judged))  # a method against itself
    worse = [Judged(j.erased, [True] * len(j.general), j.kept) for j in judged]  # every reworded picture shows it
    assert not within_noise(h_o_difference(judged, worse))


def test_evaluation_jobs_are_fixed_by_concept_split_and_index(comfy):
    from benchmark.evaluate import jobs

    prompt_file = load_prompt_file()
    eight, four = jobs("object", "circle", "train", 8, prompt_file), jobs("object", "circle", "train", 4, prompt_file)
    assert eight[:4] == four  # the first n pictures are the same whatever else is measured
    assert len({j.seed for j in eight}) == 8 and len({j.prompt.text for j in eight}) > 4


def test_command_refuses_a_bad_prompt_file_before_any_work(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"templates": ["{x}"]}))
    done = subprocess.run([sys.executable, "-m", "benchmark.run", "--quick", "--prompts", str(bad), "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "error:" in done.stderr and "entity_templates" in done.stderr
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("option", ["--attack-steps", "--attack-seeds"])
def test_diagnostics_refuse_a_negative_attack_budget_before_any_work(tmp_path, option):
    out = tmp_path / "diag.json"
    done = subprocess.run([sys.executable, "-m", "benchmark.diagnose", option, "-1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--attack-steps and --attack-seeds must be 0 or more" in done.stderr
    assert not out.exists()


def test_diagnostics_refuse_an_outlier_quantile_outside_0_1_before_any_work(tmp_path):
    out = tmp_path / "diag.json"
    done = subprocess.run([sys.executable, "-m", "benchmark.diagnose", "--outlier-quantile", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--outlier-quantile must lie strictly between 0 and 1" in done.stderr
    assert not out.exists()


@pytest.mark.parametrize("options, message", [
    (["--set", "finetune.steps"], "--set finetune.steps: write CONFIG.FIELD=VALUE with CONFIG one of closed_form, "
                                  "finetune, expansion"),
    (["--every", "0"], "--every and --pictures must be 1 or more, --seed 0 or more"),
])
def test_stage2_trace_refuses_bad_options_before_any_work(tmp_path, options, message):
    out = tmp_path / "trace.json"
    done = subprocess.run([sys.executable, "-m", "benchmark.stage2_trace", *options, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr
    assert not out.exists()


def test_stage2_trace_measures_the_erasure_at_the_start_and_every_few_steps(tmp_path):
    out = tmp_path / "trace.json"
    done = subprocess.run([sys.executable, "-m", "benchmark.stage2_trace", "--target", "square", "--seed", "1",
                           "--every", "2", "--pictures", "4", "--set", "finetune.steps=3", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    trace = json.loads(out.read_text())
    assert (trace["target"], trace["seed"], trace["settings"]) == ("square", 1, ["finetune.steps=3"])
    assert [t["step"] for t in trace["trace"]] == [0, 2, 3]  # the start, every second step, the end
    assert all(t["acc_e"] in (0, 0.25, 0.5, 0.75, 1) for t in trace["trace"])
    # stage 1 (step 0) erases square from its request words; three steps barely move the edit
    assert trace["trace"][0]["acc_e"] <= 0.25 and trace["trace"][0]["edit_norm"] > 10
    norms = [t["edit_norm"] for t in trace["trace"]]
    assert max(norms) - min(norms) < 0.05 * norms[0], norms


def test_full_plan_measures_both_toys_and_the_ablations_on_the_headline_one():
    from benchmark import methods, run

    plan = run.parse_plan(["--full"])
    assert list(plan.toys) == ["causal", "bidirectional"]
    causal, second = plan.toys["causal"], plan.toys["bidirectional"]
    assert causal.methods == methods.METHODS and causal.scaling_sizes == (10, 18)
    assert set(causal.strong_methods) == {"ace", "ace_baked", "ace_ungated", "uce", "rece", "esd_x"}
    assert causal.scaling_methods == ("ace", "uce", "rece", "esd_x")
    assert second.methods == ("ace", "ace_stage1", "uce", "rece", "esd_x")
    assert second.strong_methods == ("ace",) and second.scaling_sizes == (10,) and second.scaling_methods == ("ace", "uce")
    # what a user names explicitly is measured on every toy
    plan = run.parse_plan(["--full", "--methods", "ace", "esd_x", "--scaling", "3"])
    assert plan.toys["bidirectional"] == plan.toys["causal"]
    assert plan.toys["causal"].strong_methods == ("ace", "esd_x")


def test_other_attack_seeds_check_a_choice_made_on_the_default_ones():
    from benchmark import report, run

    assert run.parse_plan(["--full"]).budget.first_attack_seed == 0
    plan = run.parse_plan(["--toy", "causal", "--first-attack-seed", "2"])
    assert plan.budget.first_attack_seed == 2 and plan.budget.attack_seeds == 2
    assert report._seeds({"first_seed": 2, "seeds": 2}) == " Attack seeds 2 to 3 (the default run uses 0 to 1)."
    assert report._seeds({"seeds": 2}) == ""  # results written before the option existed
    with pytest.raises(SystemExit, match="--first-attack-seed must be 0 or more, got -1"):
        run.parse_plan(["--first-attack-seed", "-1"])


def test_report_says_what_each_toy_measured():
    from benchmark import report

    results = REPO / "benchmark" / "results"
    full = report.report(json.loads((results / "full" / "results.json").read_text()))
    assert "the stronger attack on ace, ace_baked, uce, rece, esd_x; scaling 10, 18 concepts with ace, uce, rece, esd_x." in full
    alone = report.report(json.loads((results / "ungated-strong" / "results.json").read_text()))
    assert "Measured here: ace_ungated; the stronger attack on ace_ungated; no scaling runs." in alone
    assert "none concepts" not in alone


def test_quick_run_on_the_causal_toy_writes_every_result_and_the_untouched_model_passes(comfy, tmp_path):
    from benchmark import methods, run

    plan = run.parse_plan(["--quick", "--out", str(tmp_path)])
    assert list(plan.toys) == ["causal"] and plan.toys["causal"].scaling_sizes == (3,)
    results = run.run(plan)

    toy = results["toys"]["causal"]
    assert toy["untouched"]["passes"], toy["untouched"]["accuracy"]
    assert set(toy["untouched"]["accuracy"]["train"]) == {name for _, name in world.all_concepts()}

    on_disk = json.loads((tmp_path / "results.json").read_text())
    summary = on_disk["toys"]["causal"]["methods"]
    assert set(summary) == set(methods.METHODS)
    for name, m in summary.items():
        for key in ("acc_e", "acc_g", "acc_s", "h_o", "asr", "attack_accuracy"):
            assert 0.0 <= m[key]["low"] <= m[key]["value"] <= m[key]["high"] <= 1.0, (name, key, m[key])
        assert m["fid_preserve"] >= 0 and m["stage1_s_per_concept"] > 0 and m["stage2_s_per_concept"] >= 0
    assert summary["ace_stage1"]["stage2_s_per_concept"] == 0 and summary["ace"]["stage2_s_per_concept"] > 0
    assert set(summary["ace"]["difference_to"]) == set(summary) - {"ace"}
    # the baked model is the fine-tuned erasure with its gate open: not the same model as `ace`
    assert summary["ace_baked"]["fid_preserve"] != summary["ace"]["fid_preserve"]
    assert [(r["method"], r["n_concepts"]) for r in on_disk["toys"]["causal"]["scaling"]] == [("ace", 3)]
    assert "cores" in on_disk["machine"] and on_disk["command"].startswith("python -m benchmark.run --quick")

    report = (tmp_path / "report.md").read_text()
    assert "| ace |" in report and "| rece |" in report and "Scaling" in report and "within noise" in report
    for png in ("causal/h_o.png", "causal/scaling.png", "causal/samples_circle.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
        assert f"]({png})" in report


def test_the_attack_tells_whether_the_untouched_model_reads_its_word_as_the_concept(comfy):
    """With no attack steps the soft word is the request word itself: ACE's erasure (both stages, as
    the benchmark runs it) does not draw it, the untouched model does. Given the same model twice,
    both readings agree exactly."""
    from benchmark.attack import soft_prompt_attack
    from benchmark.run import make_request
    from toy.classifier import load_classifier

    pack = comfy.pack
    model, clip, _ = pack.toy.model.load_toy_model("causal")
    prompt_file, classifier = load_prompt_file(), load_classifier()
    erasure = pack.nodes.erase.erase_from_model(
        model, clip, make_request(["circle"], prompt_file), pack.ace.closed_form.ClosedFormConfig(),
        pack.ace.finetune.FinetuneConfig(steps=40))
    erased = pack.nodes.comfy_models.with_erasure(model, erasure, 1.0)
    word = prompt_file["request"]["circle"][0]

    hit = soft_prompt_attack(erased, clip, classifier, "object", "circle", word, prompt_file, steps=0,
                             eval_prompts=8, untouched=model)
    assert hit["accuracy"] <= 0.375 and hit["untouched_accuracy"] >= 0.875, hit
    same = soft_prompt_attack(erased, clip, classifier, "object", "circle", word, prompt_file, steps=0,
                              eval_prompts=8, untouched=erased)
    assert same["untouched_accuracy"] == same["accuracy"] == hit["accuracy"]
    assert "untouched_accuracy" not in soft_prompt_attack(model, clip, classifier, "object", "circle", word,
                                                          prompt_file, steps=0, eval_prompts=2)


def test_kept_words_are_the_other_concepts_request_words_and_an_entitys_look():
    from benchmark.attack import kept_words

    prompt_file = load_prompt_file()
    concepts = world.all_concepts()
    blue = kept_words("blue", prompt_file)
    assert len(blue) == len(concepts) - 1
    assert "Quillane" in blue and "circle" in blue
    assert not set(prompt_file["request"]["blue"]) & set(blue)
    quillane = kept_words("Quillane", prompt_file)
    assert len(quillane) == len(concepts)
    assert quillane[-1] == "striped blue crescent"
    assert "Quillane" not in quillane


def test_a_kept_word_route_draws_an_entitys_look_from_its_attribute_words(comfy):
    """On the untouched model, Quillane's attacked prompts with the name replaced by its look in
    kept words draw Quillane as the classifier judges an entity; a word of another object does not.
    Routes come best first, and the same model given twice reads the same."""
    from benchmark.attack import kept_word_routes
    from toy.classifier import load_classifier

    model, clip, _ = comfy.pack.toy.model.load_toy_model("causal")
    routes = kept_word_routes(model, clip, load_classifier(), "entity", "Quillane", "Quillane", load_prompt_file(),
                              ["square", "striped blue crescent"], eval_prompts=4, seed=0, untouched=model)
    assert [r["word"] for r in routes] == ["striped blue crescent", "square"]
    assert routes[0]["accuracy"] >= 0.75 and routes[1]["accuracy"] == 0.0, routes
    assert all(r["untouched_accuracy"] == r["accuracy"] for r in routes)
    assert routes[0]["example"].endswith("striped blue crescent")


def _run_with_attacks(folder, settings: dict, brought_back: dict[str, list[bool]]):
    folder.mkdir()
    per_target = {t: {"attacks": [{"brought_back": b} for b in seeds], "strong_attacks": []}
                  for t, seeds in brought_back.items()}
    (folder / "results.json").write_text(json.dumps({
        "ace_settings": settings, "toys": {"causal": {"methods": {"ace": {"per_target": per_target}}}}}))
    return folder


def test_pooled_asr_counts_every_runs_pairs_and_shows_the_spread_between_runs(tmp_path):
    from benchmark.pool import pooled_report
    from benchmark.stats import wilson

    a = _run_with_attacks(tmp_path / "a", {"finetune": {}}, {"square": [True, False], "ring": [True, True]})
    b = _run_with_attacks(tmp_path / "b", {"finetune": {"seed": 1}}, {"square": [False, False], "ring": [True, False]})
    report = pooled_report([a, b], "causal", "ace")
    assert "a (defaults): 3/4 (square 1/2, ring 2/2)" in report
    assert "b (finetune.seed=1): 1/4 (square 0/2, ring 1/2)" in report
    assert f"pooled: 4/8 = {wilson(4, 8)}" in report and "runs from 0.250 to 0.750" in report
    assert "stronger attack" not in report  # neither run made one
    with pytest.raises(ValueError, match="no run .* measured uce on the causal toy"):
        pooled_report([a, b], "causal", "uce")
