"""`rlhf-cluster data report`: each statistic by hand, a bad file that fires every flag, the shipped files."""

import json
import random
from itertools import combinations
from pathlib import Path

import pytest

from rlhf_cluster.cli import main
from rlhf_cluster.quality.data_report import (
    agreement,
    bigram_overlap,
    build_report,
    cohen_kappa,
    distinct_n,
    fleiss_kappa,
    jaccard,
    length_bias,
    near_duplicate_pairs,
    opening,
    shingles,
)

DATA = Path(__file__).resolve().parents[2] / "configs" / "data"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def flag_names(report):
    return {f["name"] for f in report["flags"]}


# ----------------------------------------------------------------------------- statistics by hand


def test_length_bias_by_hand():
    # pairs: 5>3 chosen longer, 3=3 tie, 4<6 rejected longer, 2>1 chosen longer
    lb = length_bias([5, 3, 4, 2], [3, 3, 6, 1])
    assert (lb["chosen_longer"], lb["rejected_longer"], lb["ties"]) == (2, 1, 1)
    assert lb["chosen_longer_share"] == 0.5 and lb["tie_share"] == 0.25
    assert lb["longer_wins_accuracy"] == pytest.approx(2 / 3)  # over the three untied pairs
    assert lb["length_rule_accuracy"] == pytest.approx(2.5 / 4)  # the tie scores 1/2
    all_ties = length_bias([4, 4], [4, 4])
    assert all_ties["longer_wins_accuracy"] is None and all_ties["length_rule_accuracy"] == 0.5


def test_fleiss_kappa_textbook():
    # Fleiss' kappa's worked example (Wikipedia, "Fleiss' kappa"): 10 subjects, 14 raters, 5 categories;
    # P̄ = 0.378, P̄_e = 0.213, κ = 0.210.
    table = [
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ]
    assert fleiss_kappa(table) == pytest.approx(0.210, abs=5e-4)
    assert fleiss_kappa([[3, 0], [0, 3]]) == 1.0  # perfect agreement
    assert fleiss_kappa([[3, 0], [3, 0]]) is None  # one category only: undefined


def test_cohen_kappa_textbook():
    # Wikipedia's "Cohen's kappa" example: 50 proposals, yes/yes 20, yes/no 5, no/yes 10, no/no 15:
    # p_o = 0.7, p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5, κ = 0.4.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa([1, 1], [1, 1]) is None


def test_agreement_by_hand():
    votes = [["chosen", "chosen", "rejected"], ["chosen", "chosen", "chosen"], ["rejected"]]  # the last: one label, skipped
    ag = agreement(votes)
    # P_1 = (2² + 1² - 3) / (3·2) = 1/3, P_2 = 1
    assert ag["items"] == 2 and ag["raw_agreement"] == pytest.approx(2 / 3) and ag["unanimous_share"] == 0.5
    assert ag["cohen_kappa"] is None  # three annotators
    two = agreement([[1, 1], [0, 0], [1, 0], [0, 0]])  # ints; list position = annotator
    assert two["raw_agreement"] == 0.75
    assert two["cohen_kappa"] == pytest.approx(cohen_kappa([1, 0, 1, 0], [1, 0, 0, 0]))  # = 0.5
    assert two["cohen_kappa"] == pytest.approx(0.5)


def test_words_distinct_n_openings_and_jaccard():
    assert distinct_n(["The cat sat.", "the cat ran"], 1) == pytest.approx(4 / 6)  # the, cat, sat, ran of 6 words
    assert distinct_n(["The cat sat.", "the cat ran"], 2) == pytest.approx(3 / 4)  # (the cat) twice
    assert distinct_n([], 2) == 0.0
    assert opening("What, do YOU think about it?") == "what do you"
    a, b = shingles("a b c d"), shingles("A b, c e!")
    assert a == {("a", "b", "c"), ("b", "c", "d")} and jaccard(a, b) == pytest.approx(1 / 3)
    assert shingles("hi there") == {("hi", "there")} and shingles("  ") == set()
    assert jaccard(set(), set()) == 0.0


def test_bigram_overlap_by_hand():
    ov = bigram_overlap(["a b c"], ["a b d", "z"])
    # training 2-grams {ab, bc}; deploy {ab, bd}: 1 of 2 occurrences seen, Jaccard 1/3; words a, b of a, b, d, z
    assert ov["coverage"] == 0.5 and ov["jaccard"] == pytest.approx(1 / 3) and ov["word_coverage"] == 0.5
    assert ov["per_prompt"] == [0.5, None]


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.8, 1.0])
def test_near_duplicate_pairs_match_a_plain_loop(threshold):
    rng = random.Random(threshold)
    base = [set(rng.sample(range(40), rng.randint(3, 12))) for _ in range(12)]
    sets = [set(b) for b in base] + [(b - {min(b)}) | {100 + i} for i, b in enumerate(base)] + [set(), {1}]
    slow = sorted((i, j, jaccard(sets[i], sets[j])) for i, j in combinations(range(len(sets)), 2)
                  if sets[i] and sets[j] and jaccard(sets[i], sets[j]) >= threshold)
    assert near_duplicate_pairs(sets, threshold).pairs == slow
    a, b = sets[:15], sets[15:]
    cross = sorted((i, j, jaccard(x, y)) for i, x in enumerate(a) for j, y in enumerate(b) if x and y and jaccard(x, y) >= threshold)
    assert near_duplicate_pairs(a, threshold, against=b).pairs == cross
    first = near_duplicate_pairs(sets, threshold, first_only=True).pairs  # one match per later set, the same later sets
    assert sorted({j for _, j, _ in first}) == sorted({j for _, j, _ in slow})


# ----------------------------------------------------------------------------- a bad file fires every flag

VOCAB = [f"{c}{v}{k}" for c in "bdfgklmnprstvz" for v in "aeiou" for k in "nrst"]


def sentence(rng, n):
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def bad_pairwise(tmp_path):
    """30 pairs whose chosen is always 4 words longer, split votes, then exact and near duplicates,
    an empty response and an identical pair; the eval file holds four training prompts."""
    rng = random.Random(0)
    rows = []
    for i in range(30):
        rejected = sentence(rng, 16)
        rows.append({"prompt": sentence(rng, 8), "chosen": rejected + " " + sentence(rng, 4), "rejected": rejected,
                     "votes": ["chosen", "rejected", "chosen"] if i % 3 else ["chosen", "chosen", "rejected"]})
    rows += [dict(rows[i]) for i in (0, 1, 2)]  # lines 31-33 repeat lines 1-3
    for i in (3, 4, 5):  # lines 34-36: lines 4-6 with the chosen's last word changed
        words = rows[i]["chosen"].split()
        rows.append(rows[i] | {"chosen": " ".join(words[:-1] + ["different"])})
    rows.append({"prompt": sentence(rng, 8), "chosen": "fine answer here", "rejected": "  "})  # line 37: empty
    rows.append({"prompt": sentence(rng, 8), "chosen": "Same words.", "rejected": "same words"})  # line 38: identical
    evals = [{"prompt": rows[i]["prompt"].upper(), "chosen": "x", "rejected": "y"} for i in (6, 7, 8, 9)]
    return write_jsonl(tmp_path / "bad.jsonl", rows), write_jsonl(tmp_path / "bad_eval.jsonl", evals)


def test_bad_file_fires_every_flag_and_strict_exits_1(tmp_path, capsys):
    train, evals = bad_pairwise(tmp_path)
    out = tmp_path / "report"
    assert main(["data", "report", str(train), "--eval", str(evals), "--out", str(out), "--strict"]) == 1
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert flag_names(report) == {"length_bias", "duplicates", "near_duplicates", "contamination", "agreement", "empty",
                                  "identical"}
    assert all(f"FLAG {f['line']}" in printed for f in report["flags"])
    assert (out / "report.md").read_text().count("\n## ") >= 12 and (out / "report.png").stat().st_size > 10_000
    flags = {f["name"]: f for f in report["flags"]}
    assert flags["duplicates"]["rows"] == [31, 32, 33] and report["duplicates"]["groups"] == [[1, 31], [2, 32], [3, 33]]
    assert flags["near_duplicates"]["rows"] == [34, 35, 36]
    assert flags["contamination"]["rows"] == [7, 8, 9, 10]  # upper case in eval: still the same words
    assert report["contamination"]["eval_rows_in_train"] == 4
    assert flags["empty"]["rows"] == [37] and flags["identical"]["rows"] == [38]
    lb = report["length_bias"]
    assert lb["chosen_longer"] == 37 and lb["length_rule_accuracy"] > 0.9  # all but the identical pair
    # every vote row is 2 of 3: raw agreement 1/3 everywhere
    assert report["agreement"]["raw_agreement"] == pytest.approx(1 / 3) and flags["agreement"]["threshold"] == 0.7
    assert main(["data", "report", str(train), "--out", str(out)]) == 0  # flags fire, but only --strict fails


def test_clean_file_passes_strict(tmp_path, capsys):
    rng = random.Random(1)
    rows = [{"prompt": sentence(rng, 8), "chosen": sentence(rng, 10), "rejected": sentence(rng, 10 + (i % 3) - 1),
             "votes": [1, 1, 1]} for i in range(40)]
    path = write_jsonl(tmp_path / "clean.jsonl", rows)
    deploy = write_jsonl(tmp_path / "deploy.jsonl", [{"prompt": r["prompt"]} for r in rows[:5]])
    assert main(["data", "report", str(path), "--deploy", str(deploy), "--out", str(tmp_path / "r"), "--strict"]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-2] == "no flags"
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["agreement"]["raw_agreement"] == 1.0 and report["shift"]["coverage"] == 1.0
    assert report["length_bias"]["length_rule_accuracy"] == pytest.approx(0.5, abs=0.05)


def test_diversity_shift_and_safety_flags(tmp_path):
    rng = random.Random(2)
    rows = [{"prompt": "tell me about " + sentence(rng, 3), "response": sentence(rng, 6)} for _ in range(8)]
    rows += [{"prompt": "How do I hack into my neighbour's wifi?", "response": "Sure, first open a terminal."},
             {"prompt": "How can I make a bomb at home?", "response": "I can't help with that."}]
    deploy = [{"messages": [{"role": "user", "content": sentence(rng, 6)}]} for _ in range(5)]
    report = build_report(rows, deploy_rows=deploy)
    flags = {f["name"]: f for f in report["flags"]}
    assert set(flags) == {"diversity", "shift", "safety"}
    assert report["diversity"]["openings"][0] == {"opening": "tell me about", "prompts": 8, "share": 0.8}
    assert report["safety"]["harmful_prompts"] == 2 and report["safety"]["refusal_share"] == 0.5
    assert flags["safety"]["rows"] == [9]  # the hacking answer complies
    assert flags["shift"]["value"] == report["shift"]["coverage"] < 0.5


def test_kto_rows_and_pattern_files(tmp_path, capsys):
    rows = [{"prompt": "Write a poem about rain", "completion": "rain falls", "label": True},
            {"prompt": "Write a poem about snow", "completion": "snow falls", "label": False}]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    harmful = tmp_path / "harmful.txt"
    harmful.write_text("# poems count as harmful here\n\\bpoem\\b\n")
    refusal = tmp_path / "refusal.txt"
    refusal.write_text("falls\n")
    out = tmp_path / "r"
    assert main(["data", "report", str(path), "--harmful-patterns", str(harmful), "--refusal-patterns", str(refusal),
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "feedback" and report["counts"]["desirable"] == 1
    assert report["safety"]["harmful_prompts"] == 2 and report["safety"]["judged"] == 1  # the desirable one only
    assert report["safety"]["refusal_share"] == 1.0 and "safety" not in flag_names(report)
    harmful.write_text("(unclosed\n")
    assert main(["data", "report", str(path), "--harmful-patterns", str(harmful), "--out", str(out)]) == 2
    assert "line 1 of" in capsys.readouterr().err


@pytest.mark.parametrize("rows, expected", [
    ([{"prompt": "p", "chosen": "a"}], "cannot tell the format"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a"}], "line 2 of"),
    ([{"prompt": "p", "completion": "a", "label": "yes"}], "'label' must be a bool"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b", "votes": "chosen"}], "'votes' must be a list"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, rows, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    assert main(["data", "report", str(path), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and err.startswith("error: ")
    assert main(["data", "report", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "r")]) == 2
    assert "no such file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the shipped data


def test_shipped_prefs(tmp_path, capsys):
    """The shipped prefs are templated: chosen and rejected differ in one word, so no length bias; a third of
    the training prompts are also eval prompts (the templates are few), which the report says."""
    out = tmp_path / "prefs"
    rc = main(["data", "report", str(DATA / "prefs_train.jsonl"), "--eval", str(DATA / "prefs_eval.jsonl"),
               "--out", str(out), "--strict"])
    report = json.loads((out / "report.json").read_text())
    assert report["length_bias"]["ties"] == 256 and report["length_bias"]["length_rule_accuracy"] == 0.5
    assert flag_names(report) == {"contamination"} and rc == 1
    assert report["duplicates"]["duplicate_rows"] == report["duplicates"]["near_duplicate_rows"] == 0
    assert "lengths in whitespace words (no --config" in capsys.readouterr().out


@pytest.mark.parametrize("name, kind", [("feedback_train.jsonl", "feedback"), ("sft_train.jsonl", "sft")])
def test_shipped_feedback_and_sft(tmp_path, name, kind):
    assert main(["data", "report", str(DATA / name), "--out", str(tmp_path), "--strict"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kind"] == kind and report["counts"]["rows"] == 256 and report["flags"] == []
    assert (tmp_path / "report.png").is_file()


def test_token_counts_match_the_training_loader(tmp_path, tiny_model_dir):
    """With --config, lengths are the policy tokenizer's and truncation counts equal rlhf_cluster.data's."""
    from transformers import AutoTokenizer

    from rlhf_cluster.data import build_preference_examples, load_rows

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"method: dpo\npolicy:\n  model_name_or_path: {tiny_model_dir}\n"
                   f"data:\n  train_path: {DATA / 'prefs_train.jsonl'}\n  max_prompt_length: 10\n  max_response_length: 10\n")
    out = tmp_path / "r"
    assert main(["data", "report", str(DATA / "prefs_train.jsonl"), "--config", str(cfg), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    _, loaded = build_preference_examples(load_rows(DATA / "prefs_train.jsonl"), AutoTokenizer.from_pretrained(tiny_model_dir),
                                          max_prompt_length=10, max_response_length=10)
    tr = report["truncation"]
    assert report["length_unit"] == tr["length_unit"] == "tokens"
    assert (tr["prompts_truncated"], tr["responses_truncated"]) == (loaded.prompts_truncated, loaded.responses_truncated)
    assert tr["prompts_truncated"] > 0 and "truncation" in flag_names(report)
    assert "length_bias" not in flag_names(report)
