"""Round 3's answers from its committed record (star/study/round3_record.py): where each recipe meets the baseline,
the two-spread verdict, bad records, and the committed record itself."""
import json
from pathlib import Path

import pytest

from star.study.long import answer_steps
from star.study.long_arms import ROUND3_ARMS
from star.study.round3_record import compare, load_record, main, meeting_steps, pays, plan_of, recipe_steps

RECORD = Path(__file__).resolve().parents[1] / "docs" / "study" / "round3" / "measurements.json"
BASE, TUNED = "R1_llamagen", "R5_star_tuned"


def point(arm, seed, step, fid, nll, probe):
    return {"arm": arm, "seed": seed, "step": step, "fid_no_cfg": fid, "fid_cfg": fid + 1, "nll": nll,
            "probe_last": probe}


def header(measurements):
    return {"preset": "round3", "fid_samples": 5000, "cfg_scale": 2.0, "measurements": measurements}


def record_of(recipe_fids, recipe_nlls, recipe_probes):
    """The baseline at every step it is read at (FID 50 ± ~0.5, NLL 3.70 ± ~0.005, probe 0.40 ± ~0.01) and R5 at its
    last step, three seeds each."""
    wiggle = (-0.5, 0.0, 0.5)
    points = [point(BASE, seed, step, 50 + w, 3.70 + w / 100, 0.40 + w / 50)
              for step in (3000, 6150) for seed, w in enumerate(wiggle)]
    points += [point(TUNED, seed, 3000, f, n, p)
               for seed, (f, n, p) in enumerate(zip(recipe_fids, recipe_nlls, recipe_probes))]
    return header(points)


def test_recipes_meet_the_baseline_where_the_study_scored_it():
    # equal steps at the recipe's end, equal compute at steps x step cost; a fine-tune counts its start
    record = header([])
    assert meeting_steps(record, TUNED) == {"equal steps": 3000, "equal compute": 6150}
    assert recipe_steps(record, "R4_star_finetune") == (1301, 5333)
    assert meeting_steps(record, "R4_star_finetune") == {"equal steps": 6634, "equal compute": 8000}
    assert meeting_steps(record, "R6_star_one_view")["equal compute"] == 3600
    # every meeting point is a checkpoint the study keeps and scores in the baseline's run
    scored = set(answer_steps(plan_of(record), ROUND3_ARMS[0]))
    for arm in ROUND3_ARMS[1:]:
        assert set(meeting_steps(record, arm.key).values()) <= scored, arm.key


def test_a_recipe_pays_only_beyond_two_spreads_with_a_probe_lead():
    # 3 FID better, probe 0.1 better, both far beyond 2 sd: pays
    record = record_of((46.5, 47.0, 47.5), (3.70, 3.705, 3.71), (0.49, 0.50, 0.51))
    better = compare(record, TUNED)
    assert [c.where for c in better] == ["equal steps", "equal compute"]
    assert better[1].baseline_step == 6150 and pays(better[1], record) == "**yes**"
    # the same FID lead but no probe lead: does not pay
    record = record_of((46.5, 47.0, 47.5), (3.70, 3.705, 3.71), (0.39, 0.40, 0.41))
    assert pays(compare(record, TUNED)[1], record) == "no: no probe lead beyond the spread"
    # a 1-point FID lead inside the baseline's 2 sd (2 x 0.5): not real, does not pay
    record = record_of((48.5, 49.0, 49.5), (3.70, 3.705, 3.71), (0.49, 0.50, 0.51))
    level = compare(record, TUNED)[1]
    fid_gap = level.rows[0][3]
    assert fid_gap.gap == pytest.approx(-1.0) and fid_gap.better and not fid_gap.real
    assert pays(level, record) == "no: no FID or NLL gain beyond the spread"
    # one seed of the recipe: no spread, no verdict
    record = record_of((40.0,), (3.5,), (0.6,))
    assert pays(compare(record, TUNED)[1], record).startswith("undecided")


def test_a_bad_record_is_refused_naming_the_entry(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(header([point("R9_nope", 0, 3000, 50, 3.7, 0.4)])))
    with pytest.raises(ValueError, match="measurement 0 names arm 'R9_nope'"):
        load_record(path)
    path.write_text(json.dumps(header([point(BASE, 0, 3000, 50, 3.7, 0.4)] * 2)))
    with pytest.raises(ValueError, match="measured twice"):
        load_record(path)
    path.write_text(json.dumps({**header([]), "preset": "long"}))
    with pytest.raises(ValueError, match="'long' is not a round-3 preset"):
        load_record(path)
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2
    # a record without the baseline: nothing to compare with, a clear error rather than a traceback
    path.write_text(json.dumps(header([point(TUNED, 0, 3000, 50, 3.7, 0.4)])))
    assert main([str(path), "--out", str(tmp_path / "out")]) == 2


def test_the_committed_record_renders_every_recipe(tmp_path):
    assert main([str(RECORD), "--out", str(tmp_path)]) == 0
    answers = (tmp_path / "answers.md").read_text()
    for arm in ROUND3_ARMS[1:]:
        assert arm.label in answers
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    record = load_record(RECORD)
    # every recipe and the baseline at each meeting point have at least two seeds: a spread to judge by
    for arm in ROUND3_ARMS[1:]:
        for comparison in compare(record, arm.key):
            for _, base, mine, _ in comparison.rows:
                assert len(base) >= 2 and len(mine) >= 2, (arm.key, comparison.where)
