"""``rlhf-cluster eval``: a trained policy against its reference on held-out prompts, on the real actors (issue 11,
part 1).

:func:`run_eval` reads as the procedure:

1. **inputs** (:func:`prepare_eval`): every file read, parsed and tokenized, the model directories, the reward
   source and the judge's key checked, before any actor starts; a problem is one ConfigError / DataError line;
2. **actors** (:func:`eval_roles`): a vLLM engine and a frozen scorer for each model, and the training reward source;
3. **generate**: ``samples`` answers per eval prompt from both models, one answer per probe prompt (refusals,
   sycophancy), and with ``self_check`` a second, independent set of the reference's answers;
4. **score**: every eval answer's reward; log-probs and entropy under both models (KL on the policy's answers); the
   sequence log-probs of the ``pairs`` and ``capability`` responses under both models;
5. **metrics**: win rate with its bootstrap interval and the rest, from the pure functions of
   :mod:`rlhf_cluster.quality.evaluation` and the small ones here;
6. **judge**: an LLM judge over HTTP (both orders), when asked, after the actors are shut down;
7. **write**: ``eval.json``, ``eval.md``, ``eval.png`` (and ``judge.jsonl``, a line per prompt as its verdict arrives).

Every answer is drawn with its own seed (stream ``k`` draws answer ``j`` of prompt ``i`` with
``stream_seed(seed, k) + i * samples + j``), so the two models' answers are independent (a model compared with
itself wins about half the prompts, as it should) and two ``--seed`` values share no draw.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rlhf_cluster.cluster.actors import ReferenceActor, RewardActor, RolloutActor
from rlhf_cluster.cluster.groups import ActorGroup, LocalGroup, Pending, RoleGroup, check_capacity, cluster_has_gpus, split_rows
from rlhf_cluster.cluster.layout import RoleSpec
from rlhf_cluster.cluster.roles import Roles, thread_budget
from rlhf_cluster.cluster.specs import engine_spec, reward_spec, scorer_spec
from rlhf_cluster.config import SHIPPED, ConfigError, RunConfig, _check_reward_source, absolute_path
from rlhf_cluster.data import DataReport, PreferenceExample, PromptExample, Rows, SFTExample, build_prompt_examples, load_examples
from rlhf_cluster.drivers.offline import collate_pairs, collate_sft
from rlhf_cluster.drivers.rl import check_reward_fields
from rlhf_cluster.experience import Experience, build_experience
from rlhf_cluster.models import load_tokenizer
from rlhf_cluster.quality.data_report import REFUSAL_PATTERNS, compile_patterns, matches
from rlhf_cluster.quality.evaluation import AGREEMENT_PATTERNS, distinct, format_eval_markdown, self_similarity, win_rate
from rlhf_cluster.quality.judge import JudgeConfig, conversation_answer, conversation_request, judge_pairwise
from rlhf_cluster.quality.prompt_files import EvalPrompt, load_eval_prompts
from rlhf_cluster.workers.reward_sources import RewardInputs

PROBES = ("benign", "harmful", "sycophancy")
SHIPPED_PROBES = {name: SHIPPED / "data" / f"eval_{name}.jsonl" for name in PROBES}
SEED_STRIDE = 1 << 20  # answers per stream of seeds (see stream_seed)
STREAMS = 16  # streams per --seed: the prompts of each model, the self-check, each probe of each model
MD_SAMPLES = 5  # prompts shown in eval.md's samples table
MAX_BATCH_ROWS = 256  # vLLM's default max_num_seqs: a CPU engine's KV cache is sized for at most this many rows


# ----------------------------------------------------------------------------- what was asked, what was checked


@dataclass
class EvalOptions:
    """The flags of ``rlhf-cluster eval`` (paths as given; relative ones are taken from the working directory)."""

    policy: str
    reference: str | None = None  # default: the config's reference.model_name_or_path, else policy.model_name_or_path
    prompts: str | None = None  # default: data.eval_path
    samples: int = 1
    max_prompts: int | None = None
    pairs: str | None = None
    beta: float | None = None  # default: preference.beta
    capability: str | None = None
    benign: str | None = None
    harmful: str | None = None
    sycophancy: str | None = None
    probes: bool = True  # the shipped probe sets for the probes not given a file
    refusal_patterns: str | None = None
    agreement_patterns: str | None = None
    judge_url: str | None = None
    judge_model: str | None = None
    judge_key_env: str | None = None
    judge_timeout: float | None = None
    self_check: bool = False
    out: str | None = None
    seed: int | None = None  # default: the config's seed


@dataclass
class PromptSet:
    """One prompt file: as read (``items``) and tokenized for generation (``examples``, the same order)."""

    path: str
    items: list[EvalPrompt]
    examples: list[PromptExample]
    report: DataReport
    shipped: bool = False


@dataclass
class EvalInputs:
    """Everything :func:`prepare_eval` checked, before any actor starts."""

    cfg: RunConfig
    policy: str
    reference: str
    out: Path
    seed: int
    samples: int
    tokenizer: Any
    prompts: PromptSet
    probes: dict[str, PromptSet]
    pairs: list[PreferenceExample] | None
    capability: list[SFTExample] | None
    beta: float
    refusal: list[re.Pattern]
    agreement: list[re.Pattern]
    judge: JudgeConfig | None
    self_check: bool
    notes: list[str] = field(default_factory=list)
    second_turns: list[int] = field(default_factory=list)  # the prompts asked their second turn (their indices)

    @property
    def with_reward(self) -> bool:
        return self.cfg.reward.kind is not None


def default_out_dir(policy: str | Path) -> Path:
    """Where an eval of ``policy`` goes without ``--out``: ``eval/`` beside a ``policy/`` directory (a training run's
    output_dir, or a checkpoint's folder), else ``<model dir>_eval`` beside the model directory."""
    p = Path(os.path.abspath(policy))
    return p.parent / "eval" if p.name == "policy" else p.with_name(p.name + "_eval")


def _model_dir(what: str, path: str) -> str:
    path = absolute_path(path, Path.cwd())
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{what}={path!r} is not a local Hugging Face model directory (no config.json there)")
    return path


def _input_file(what: str, path: str) -> str:
    path = absolute_path(path, Path.cwd())
    if not Path(path).exists():
        raise ConfigError(f"{what} {path!r} does not exist")
    return path


def _pattern_file(what: str, path: str) -> list[re.Pattern]:
    path = _input_file(what, path)
    patterns = compile_patterns(Path(path).read_text(encoding="utf-8").splitlines(), path)
    if not patterns:
        raise ConfigError(f"{what} {path!r} holds no pattern (one regular expression per line; # starts a comment)")
    return patterns


def tokenize_prompts(path: str, items: list[EvalPrompt], tokenizer, data, shipped: bool = False) -> PromptSet:
    """Eval prompts as the training loader tokenizes prompts (``build_prompt_examples``: the chat template,
    ``data.max_prompt_length``, ``data.truncation``); a prompt given as chat messages keeps them; each example's
    ``extra`` is the row's other fields (what a reward function's named parameters read)."""
    rows = Rows([{**{k: v for k, v in p.extra.items() if k != "prompt"}, "prompt": p.messages or p.prompt} for p in items],
                source=path, numbers=[p.row for p in items], unit="line" if path.endswith(".jsonl") else "row")
    examples, report = build_prompt_examples(rows, tokenizer, source=path, prompt_key="prompt",
                                             apply_chat_template=data.apply_chat_template,
                                             max_prompt_length=data.max_prompt_length, truncation=data.truncation)
    return PromptSet(path, items, examples, report, shipped)


TURN2_STREAMS = {"policy": 9, "reference": 10}  # the second turns' seed streams (stream_seed)


def second_turn_examples(ins: EvalInputs, first: list[str]) -> tuple[list[PromptExample], int]:
    """The prompts of ``ins.second_turns`` as one model's conversation so far: the first turn (or
    the file's messages), that model's own first answer (``first[i]``), then turn 2; tokenized like the first turns.
    One longer than data.max_prompt_length keeps its end whatever data.truncation says (the answers it holds are not
    known before the actors start). Returns the examples and how many were cut."""
    idx = ins.second_turns
    rows = []
    for i in idx:
        p = ins.prompts.items[i]
        head = p.messages or [{"role": "user", "content": p.prompt}]
        rows.append({"prompt": [*head, {"role": "assistant", "content": first[i]}, {"role": "user", "content": p.turns[1]}]})
    d = ins.cfg.data
    examples, report = build_prompt_examples(
        Rows(rows, source=f"{ins.prompts.path} (turn 2)", numbers=[ins.prompts.items[i].row for i in idx]), ins.tokenizer,
        prompt_key="prompt", apply_chat_template=True, max_prompt_length=d.max_prompt_length, truncation="truncate")
    return examples, report.prompts_truncated


def prepare_eval(cfg: RunConfig, opts: EvalOptions, log=print) -> EvalInputs:
    """Every input read and checked, nothing started: the model directories and their tokenizers, the prompt files
    (parsed and tokenized), the reward source (a function is imported and tried once, as ``train`` does), the pattern
    files, the judge's settings and key, and the output directory (created)."""
    if opts.samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {opts.samples}")
    if opts.max_prompts is not None and opts.max_prompts < 1:
        raise ConfigError(f"--max-prompts must be >= 1, got {opts.max_prompts}")
    policy = _model_dir("--policy", opts.policy)
    if opts.reference is not None:
        reference = _model_dir("--reference", opts.reference)
    elif cfg.reference.model_name_or_path is not None:
        reference = _model_dir("reference.model_name_or_path (the default --reference)", cfg.reference.model_name_or_path)
    else:
        reference = _model_dir("policy.model_name_or_path (the default --reference)", cfg.policy.model_name_or_path)
    tokenizer = load_tokenizer(policy)
    if tokenizer.get_vocab() != load_tokenizer(reference).get_vocab():
        raise ConfigError(f"the policy {policy} and the reference {reference} have different tokenizers; the eval compares "
                          "their log-probs token by token, so the policy must be trained from the reference")
    judge = _judge_config(opts)
    notes: list[str] = []
    d = cfg.data

    # the eval prompts
    if opts.prompts is not None:
        path, key = _input_file("--prompts", opts.prompts), None  # any format load_eval_prompts reads
    elif d.eval_path is not None:
        path, key = _input_file("data.eval_path", d.eval_path), (d.prompt_key if d.prompt_key != "prompt" else None)
    else:
        raise ConfigError("no eval prompts: pass --prompts FILE or set data.eval_path in the config")
    items = load_eval_prompts(path, prompt_key=key)
    if opts.max_prompts is not None:
        items = items[: opts.max_prompts]
    # a second turn is asked after each model's own first answer, through the chat template (no conversation without it)
    multi = [i for i, p in enumerate(items) if len(p.turns) > 1]
    second_turns = multi if d.apply_chat_template else []
    if multi:
        notes.append(f"{path}: {len(multi)} multi-turn prompts: the reward, KL and probes read the first turn's answers; "
                     + ("turn 2 is asked after each model's own first answer and the judge sees both turns"
                        + (" (turns after the second are not asked)" if any(len(items[i].turns) > 2 for i in multi) else "")
                        if second_turns else "only the first turn is asked (data.apply_chat_template is false)"))
    prompts = tokenize_prompts(path, items, tokenizer, d)
    log(prompts.report.summary())

    # the reward: the training source, checked as train checks it
    if cfg.reward.kind is None:
        notes.append("the config names no reward: no win rate by reward (the judge, KL and the probes still run)")
    else:
        _check_reward_source(cfg.reward)
        if cfg.reward.kind == "model":
            _model_dir("reward.model_name_or_path", cfg.reward.model_name_or_path)
        check_reward_fields(cfg, prompts.examples, prompts.report)

    probes = {}
    for name in PROBES:
        given = getattr(opts, name)
        if given is None and not opts.probes:
            continue
        p = _input_file(f"--{name}", given) if given is not None else str(SHIPPED_PROBES[name])
        probes[name] = tokenize_prompts(p, load_eval_prompts(p), tokenizer, d, shipped=given is None)

    common = dict(prompt_key=d.prompt_key, apply_chat_template=d.apply_chat_template, max_prompt_length=d.max_prompt_length,
                  max_response_length=d.max_response_length, truncation=d.truncation)
    pairs = capability = None
    if opts.pairs is not None:
        pairs, rep = load_examples("preference", _input_file("--pairs", opts.pairs), tokenizer, chosen_key=d.chosen_key,
                                   rejected_key=d.rejected_key, margin_key=d.margin_key, **common)
        log(rep.summary())
    if opts.capability is not None:
        capability, rep = load_examples("sft", _input_file("--capability", opts.capability), tokenizer,
                                        response_key=d.response_key, messages_key=d.messages_key, **common)
        log(rep.summary())
    beta = cfg.preference.beta if opts.beta is None else opts.beta
    if not beta > 0:
        raise ConfigError(f"--beta must be > 0, got {beta}")

    refusal = (_pattern_file("--refusal-patterns", opts.refusal_patterns) if opts.refusal_patterns
               else compile_patterns(REFUSAL_PATTERNS))
    agreement = (_pattern_file("--agreement-patterns", opts.agreement_patterns) if opts.agreement_patterns
                 else compile_patterns(AGREEMENT_PATTERNS))
    r = cfg.rollout
    if r.temperature != 1.0 or r.top_p < 1.0 or r.top_k > 0:
        notes.append(f"answers sampled with temperature {r.temperature:g}, top_p {r.top_p:g}, top_k {r.top_k}: the KL and "
                     "entropy are measured on those answers, not on samples of the policy itself")
    out = Path(absolute_path(opts.out, Path.cwd())) if opts.out else default_out_dir(policy)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    return EvalInputs(cfg, policy, reference, out, cfg.seed if opts.seed is None else opts.seed, opts.samples, tokenizer,
                      prompts, probes, pairs, capability, beta, refusal, agreement, judge, opts.self_check, notes,
                      second_turns)


def _judge_config(opts: EvalOptions) -> JudgeConfig | None:
    if opts.judge_url is None and opts.judge_model is None:
        if opts.judge_key_env is not None or opts.judge_timeout is not None:
            raise ConfigError("--judge-key-env and --judge-timeout need --judge-url and --judge-model")
        return None
    if opts.judge_url is None or opts.judge_model is None:
        raise ConfigError("the judge needs both --judge-url URL and --judge-model NAME")
    try:
        judge = JudgeConfig(url=opts.judge_url, model=opts.judge_model, api_key_env=opts.judge_key_env,
                            **({"timeout_s": opts.judge_timeout} if opts.judge_timeout is not None else {}))
    except ValueError as e:
        raise ConfigError(f"--judge-*: {e}") from None
    if judge.api_key_env and not os.environ.get(judge.api_key_env):
        raise ConfigError(f"--judge-key-env {judge.api_key_env}: that environment variable is not set (it holds the "
                          "judge's API key)")
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(judge.url)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:  # a judge that is not up is found now, not after every answer has been generated
        socket.create_connection((u.hostname, port), timeout=min(judge.timeout_s, 10.0)).close()
    except OSError as e:
        raise ConfigError(f"--judge-url {judge.url}: cannot connect to {u.hostname}:{port} ({e.strerror or e}); start the "
                          "judge's server first, or fix the URL") from None
    return judge


# ----------------------------------------------------------------------------- the actors


def eval_layout(cfg: RunConfig, with_reward: bool) -> dict[str, tuple[RoleSpec, type]]:
    """The eval's roles: a vLLM engine group and a frozen scorer for each model (rollout.num_engines engines and the
    reference section's replicas each), and the reward source as configured."""
    r = cfg.rollout
    engines = dict(num_nodes=1, per_node=r.num_engines, gpus_per_actor=float(r.tensor_parallel_size))
    scorers = dict(num_nodes=cfg.reference.num_nodes, per_node=cfg.reference.num_gpus_per_node)
    out = {}
    for model in ("policy", "reference"):
        out[f"{model}_engine"] = (RoleSpec(f"{model}_engine", **engines), RolloutActor)
        out[f"{model}_scorer"] = (RoleSpec(f"{model}_scorer", **scorers), ReferenceActor)
    if with_reward:
        out["reward"] = (RoleSpec("reward", cfg.reward.num_nodes, cfg.reward.num_gpus_per_node,
                                  gpus_per_actor=1.0 if cfg.reward.kind == "model" else 0.0), RewardActor)
    return out


@contextmanager
def eval_roles(cfg: RunConfig, policy: str, reference: str, with_reward: bool, log=print, rows: int = 0):
    """Connect (or start a local Ray), start and load every eval role at once; shut them down on the way out.

    ``rows``: the most answers one generate call asks for; a CPU engine's KV cache is sized for them (up to
    MAX_BATCH_ROWS per engine, and never below what the training config sizes it for)."""
    layout = eval_layout(cfg, with_reward)
    local = cfg.cluster.backend == "local"
    if not local:
        from rlhf_cluster.cluster.connect import check_paths_on_nodes, connect, stage_module

        code = None
        if with_reward and cfg.reward.kind == "function" and cfg.reward.code_dir:
            code = stage_module(cfg.reward.code_dir, cfg.reward.function.partition(":")[0])
        connect(cfg.cluster.address, num_cpus=cfg.cluster.num_cpus, timeout_s=cfg.cluster.connect_timeout_s, working_dir=code)
        if cfg.cluster.address is not None:
            models = {"--policy": policy, "--reference": reference}
            if with_reward and cfg.reward.kind == "model":
                models["reward.model_name_or_path"] = cfg.reward.model_name_or_path
            check_paths_on_nodes(models, {})
    t = time.perf_counter()
    roles = Roles()
    try:
        if local:
            roles.groups = {name: LocalGroup(spec, shell) for name, (spec, shell) in layout.items()}
        else:
            c = cfg.cluster
            roles.use_gpu = c.device == "cuda" or (c.device == "auto" and cluster_has_gpus())
            check_capacity([spec for spec, _ in layout.values()], roles.use_gpu)
            for name, (spec, shell) in layout.items():
                roles.groups[name] = ActorGroup(spec, shell, use_gpu=roles.use_gpu, cpus_per_actor=c.cpus_per_actor)
        for g in roles.all():
            g.call_timeout_s = cfg.cluster.call_timeout_s
            g.phase_timeouts_s = dict(cfg.cluster.phase_timeouts_s)
        pending = []
        for model, path in (("policy", policy), ("reference", reference)):
            engines = roles.groups[f"{model}_engine"]
            specs = []
            for i in range(len(engines)):
                spec = engine_spec(cfg, i, None)
                batch = max(spec.batch_rows, min(-(-rows // len(engines)), MAX_BATCH_ROWS))
                specs.append((replace(spec, model_path=path, batch_rows=batch),))
            pending.append(engines.each(RolloutActor.init, specs, what="init"))
            pending.append(roles.groups[f"{model}_scorer"].call(ReferenceActor.init, replace(scorer_spec(cfg.reference),
                                                                                              model_path=path), what="init"))
        if with_reward:
            pending.append(roles.groups["reward"].call(RewardActor.init, reward_spec(cfg.reward), what="init"))
        for p in pending:
            p.get()
        roles.budget = thread_budget(cfg, roles)
        log(f"actors ready in {time.perf_counter() - t:.1f} s: {roles.summary()}")
        yield roles
    finally:
        roles.shutdown()


# ----------------------------------------------------------------------------- generation and scoring


@dataclass
class Answers:
    """One model's answers to a prompt set, ``n`` per prompt: prompt i's are rows [i*n, (i+1)*n)."""

    n: int
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]

    def per_prompt(self, values) -> list[list]:
        values = values.tolist() if hasattr(values, "tolist") else list(values)
        return [values[i : i + self.n] for i in range(0, len(values), self.n)]

    def experience(self, pad_id: int) -> Experience:
        return build_experience(self.prompt_ids, self.response_ids, pad_id)


def stream_seed(seed: int, stream: int) -> int:
    """The first seed of one stream of answers: streams of every ``seed`` are disjoint blocks of SEED_STRIDE seeds
    (``seed + i`` would make ``--seed 1`` and ``--seed 2`` draw the same answers, one prompt apart)."""
    if not 0 <= stream < STREAMS:
        raise ValueError(f"stream must be in [0, {STREAMS}), got {stream}")
    return (seed * STREAMS + stream) * SEED_STRIDE % 2**62


def submit_generate(engines: RoleGroup, examples: list[PromptExample], n: int, seed: int, sampling: dict) -> Pending:
    """``n`` answers per prompt, the rows spread over the engines: answer j of prompt i is its own request with seed
    ``seed + i * n + j``. (One request with vLLM's ``n`` would seed its answer j with the request's seed + j, the
    seed of the next prompt's first answer: answers of neighbouring prompts would share their random draws, and
    the bootstrap over prompts needs them independent.)"""
    rows = [e.prompt_ids for e in examples for _ in range(n)]
    parts = split_rows(len(rows), len(engines))
    return engines.each(RolloutActor.generate, [(rows[s], seed + s.start) for s in parts], n=1, **sampling, what="generate")


def collect(pending: Pending, n: int, tokenizer) -> Answers:
    samples = [s for part, _ in pending.get() for s in part]
    ids = [s.response_ids for s in samples]
    return Answers(n, [s.prompt_ids for s in samples], ids, tokenizer.batch_decode(ids, skip_special_tokens=True),
                   [s.finish_reason == "length" for s in samples])


def reward_inputs(answers: Answers, prompts: PromptSet, pad_id: int, needs_text: bool) -> RewardInputs:
    """What the reward source reads, as in training: token ids for a reward model; else the (templated) prompt text,
    the answer and the row's dataset fields."""
    if not needs_text:
        return RewardInputs(exp=answers.experience(pad_id))
    return RewardInputs(prompts=[e.prompt_text for e in prompts.examples for _ in range(answers.n)], responses=answers.texts,
                        extras=[e.extra for e in prompts.examples for _ in range(answers.n)])


def _pair(pending: Pending) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropy) of a sharded logprobs_and_entropy call, the ranks' rows in order."""
    parts = pending.get()
    return torch.cat([lp for lp, _ in parts]), torch.cat([h for _, h in parts])


# ----------------------------------------------------------------------------- metrics (pure)


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``x`` over the real tokens (``mask``); 0 when there are none."""
    return float((x * mask).sum() / mask.sum().clamp(min=1))


def kl_stats(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> dict:
    """KL(π‖π_ref) estimated on π's own answers with k1 = log π(a_t) − log π_ref(a_t), (B, A) each: per token (over
    all answer tokens), per answer (each answer's sum, averaged), and every answer's sum (``per_answer``)."""
    k1 = (logp - ref_logp) * mask
    seq = k1.sum(-1)
    return {"kl_per_token": token_mean(k1, mask), "kl_per_sequence": float(seq.mean()) if len(seq) else 0.0,
            "per_answer": seq.tolist()}


def preference_stats(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> dict:
    """Held-out preference accuracy of the policy's implicit reward r = β (log π(y|x) − log π_ref(y|x)) (DPO's): rows
    2i / 2i+1 are pair i's chosen / rejected response, (2B,) sequence log-probs each. ``accuracy``: share of pairs with
    r(chosen) > r(rejected), a tie counting ½ (the reference against itself: 0.5); ``margin``: mean r(chosen) −
    r(rejected); also the share of pairs where the policy alone, and the reference alone, give the chosen response
    the higher likelihood."""
    r = beta * (policy_logps - reference_logps)
    diff = r[0::2] - r[1::2]
    likelier = lambda lp: float(((lp[0::2] > lp[1::2]).float() + 0.5 * (lp[0::2] == lp[1::2]).float()).mean())
    return {"n": int(diff.numel()), "beta": beta,
            "accuracy": float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean()), "margin": float(diff.mean()),
            "policy_likelihood_accuracy": likelier(policy_logps), "reference_likelihood_accuracy": likelier(reference_logps)}


def nll_per_token(sequence_logps: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean negative log-likelihood per response token over a whole file: −Σ log p / Σ tokens."""
    return float(-sequence_logps.sum() / mask.sum().clamp(min=1))


def side_metrics(answers: Answers, mask: torch.Tensor, entropy: torch.Tensor, rewards: torch.Tensor | None) -> dict:
    """One model's columns of the metrics table: reward mean/std, length, truncation, entropy, diversity."""
    m: dict = {}
    if rewards is not None:
        m["reward_mean"] = float(rewards.mean())
        m["reward_std"] = float(rewards.std(correction=0))
    m["length_mean"] = float(mask.sum(-1).mean())
    m["truncated"] = sum(answers.truncated) / len(answers.truncated)
    m["entropy"] = token_mean(entropy, mask)
    m.update(distinct(answers.texts))
    if answers.n > 1:
        per = answers.per_prompt(answers.texts)
        m["self_similarity"] = sum(self_similarity(t) for t in per) / len(per)
    return m


def probe_rate(policy: Answers, reference: Answers, patterns: list[re.Pattern], prompts: PromptSet,
               label: str = "match") -> tuple[dict, list[dict]]:
    """The share of each model's answers that match ``patterns`` (a refusal, an agreement), and the rows (each
    answer's match as ``policy_<label>`` / ``reference_<label>``)."""
    hits = {"policy": matches(policy.texts, patterns), "reference": matches(reference.texts, patterns)}
    summary = {side: sum(h) / len(h) for side, h in hits.items()}
    summary.update(n=len(prompts.items), prompts=prompts.path + (" (shipped)" if prompts.shipped else ""))
    rows = [{"id": p.id, "prompt": p.prompt, "policy": policy.texts[i], "reference": reference.texts[i],
             f"policy_{label}": hits["policy"][i], f"reference_{label}": hits["reference"][i], **({"extra": p.extra} if p.extra else {})}
            for i, p in enumerate(prompts.items)]
    return summary, rows


def describe_reward(cfg: RunConfig) -> str | None:
    r = cfg.reward
    return {"function": f"reward function {r.function}", "http": f"reward server {r.url}",
            "model": f"reward model {r.model_name_or_path}"}.get(r.kind)


# ----------------------------------------------------------------------------- the procedure


def run_eval(cfg: RunConfig, opts: EvalOptions, log=print) -> dict:
    """Evaluate ``opts.policy`` against its reference as the module docstring describes; returns the result dict
    (:func:`rlhf_cluster.quality.evaluation.format_eval_markdown`'s shape, plus ``rows``, ``probe_rows``, ``paths``)."""
    ins = prepare_eval(cfg, opts, log)
    tok, pad = ins.tokenizer, ins.tokenizer.pad_token_id
    r = cfg.rollout
    sampling = dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k)
    seed_of = lambda stream: stream_seed(ins.seed, stream)
    scores: dict[str, Any] = {}
    rows = max([len(ins.prompts.examples) * ins.samples] + [len(p.examples) for p in ins.probes.values()])
    with eval_roles(cfg, ins.policy, ins.reference, ins.with_reward, log, rows) as roles:
        g = roles.groups
        # generate: every request queued on both engines before any result is awaited, so the engines work at once
        t = time.perf_counter()
        with roles.sharing("policy_engine", "reference_engine"):
            asked = {("policy", "prompts"): submit_generate(g["policy_engine"], ins.prompts.examples, ins.samples, seed_of(0),
                                                            sampling),
                     ("reference", "prompts"): submit_generate(g["reference_engine"], ins.prompts.examples, ins.samples,
                                                               seed_of(1), sampling)}
            if ins.self_check:
                asked["check", "prompts"] = submit_generate(g["reference_engine"], ins.prompts.examples, ins.samples,
                                                            seed_of(2), sampling)
            for k, name in enumerate(ins.probes):
                for j, model in enumerate(("policy", "reference")):
                    asked[model, name] = submit_generate(g[f"{model}_engine"], ins.probes[name].examples, 1,
                                                         seed_of(3 + 2 * k + j), sampling)
            answers = {key: collect(p, ins.samples if key[1] == "prompts" else 1, tok) for key, p in asked.items()}
            turn2: dict[str, list[str]] = {}
            cut = 0  # second-turn conversations cut to data.max_prompt_length, both models
            if ins.second_turns:  # each model goes on from its own first answer (MT-Bench's turn 2)
                asked2 = {}
                for model in ("policy", "reference"):
                    a = answers[model, "prompts"]
                    examples, n_cut = second_turn_examples(ins, [x[0] for x in a.per_prompt(a.texts)])
                    cut += n_cut
                    asked2[model] = submit_generate(g[f"{model}_engine"], examples, 1, seed_of(TURN2_STREAMS[model]), sampling)
                turn2 = {model: collect(p, 1, tok).texts for model, p in asked2.items()}
        log(f"generated {sum(len(a.texts) for a in answers.values()) + sum(map(len, turn2.values()))} answers in "
            f"{time.perf_counter() - t:.1f} s")

        # score: rewards, log-probs and entropy under both models, pairs and capability, all roles at once
        t = time.perf_counter()
        pol, ref = answers["policy", "prompts"], answers["reference", "prompts"]
        exp_pol, exp_ref = pol.experience(pad), ref.experience(pad)
        with roles.sharing(*g):
            pending: dict[str, Pending] = {}
            if ins.with_reward:
                text = cfg.reward.kind != "model"
                for side in ("policy", "reference", "check"):
                    if (side, "prompts") in answers:
                        pending[f"reward_{side}"] = g["reward"].shard(
                            RewardActor.score, reward_inputs(answers[side, "prompts"], ins.prompts, pad, text), what="reward")
            pending["policy_lp"] = g["policy_scorer"].shard(ReferenceActor.logprobs_and_entropy, exp_pol, what="log-probs")
            pending["reference_lp_on_policy"] = g["reference_scorer"].shard(ReferenceActor.logprobs, exp_pol, what="log-probs")
            pending["reference_lp"] = g["reference_scorer"].shard(ReferenceActor.logprobs_and_entropy, exp_ref, what="log-probs")
            pair_seqs = collate_pairs(ins.pairs, pad).seqs if ins.pairs else None
            cap = collate_sft(ins.capability, pad) if ins.capability else None
            for name, exp in (("pairs", pair_seqs), ("capability", cap)):
                if exp is not None:
                    for model in ("policy", "reference"):
                        pending[f"{name}_{model}"] = g[f"{model}_scorer"].shard(ReferenceActor.sequence_logps, exp, what=name)
            for key, p in pending.items():
                scores[key] = _pair(p) if key in ("policy_lp", "reference_lp") else p.cat()
        log(f"scored in {time.perf_counter() - t:.1f} s")

    result = eval_result(ins, answers, scores, exp_pol.action_mask, exp_ref.action_mask,
                         pair_seqs, cap.action_mask if cap is not None else None)
    if turn2:
        for k, i in enumerate(ins.second_turns):
            result["rows"][i]["turn2"] = {"prompt": ins.prompts.items[i].turns[1], "policy": turn2["policy"][k],
                                          "reference": turn2["reference"][k]}
        result["second_turn"] = {"n": len(turn2["policy"]), "cut_to_max_prompt_length": cut}
        if cut:
            result["notes"].append(f"{cut} of the {2 * len(turn2['policy'])} second-turn conversations (both models) were "
                                   f"longer than data.max_prompt_length={cfg.data.max_prompt_length} and kept their end")
    if ins.judge is not None:
        result["judge"] = run_judge(ins, pol, ref, log, turn2)
    result["paths"] = write_eval(result, ins.out)
    return result


def eval_result(ins: EvalInputs, answers: dict, scores: dict, mask_pol: torch.Tensor, mask_ref: torch.Tensor,
                pair_seqs: Experience | None, cap_mask: torch.Tensor | None) -> dict:
    """The numbers: win rate, per-model metrics, probes, pairs and capability, and the per-prompt rows."""
    cfg, pol, ref = ins.cfg, answers["policy", "prompts"], answers["reference", "prompts"]
    r = cfg.rollout
    res: dict = {"policy": ins.policy, "reference": ins.reference,
                 "prompts": ins.prompts.path, "n_prompts": len(ins.prompts.items), "samples_per_prompt": ins.samples,
                 "scored_by": describe_reward(cfg), "seed": ins.seed,
                 "sampling": dict(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens),
                 "created": datetime.datetime.now().isoformat(timespec="seconds")}
    lp_pol, ent_pol = scores["policy_lp"]
    _, ent_ref = scores["reference_lp"]
    kl = kl_stats(lp_pol, scores["reference_lp_on_policy"], mask_pol)
    rw_pol, rw_ref = scores.get("reward_policy"), scores.get("reward_reference")
    metrics = {"policy": side_metrics(pol, mask_pol, ent_pol, rw_pol), "reference": side_metrics(ref, mask_ref, ent_ref, rw_ref)}
    metrics["policy"].update(kl_per_token=kl["kl_per_token"], kl_per_sequence=kl["kl_per_sequence"])
    if rw_pol is not None:
        boot = ins.seed % 2**32  # the bootstrap's generator seed (numpy wants it >= 0)
        res["win_rate"] = win_rate(pol.per_prompt(rw_pol), ref.per_prompt(rw_ref), seed=boot)
        if "reward_check" in scores:
            res["self_check"] = win_rate(answers["check", "prompts"].per_prompt(scores["reward_check"]), ref.per_prompt(rw_ref),
                                         seed=boot)

    probe_rows = {}
    for name, patterns, label in (("harmful", ins.refusal, "refused"), ("benign", ins.refusal, "refused"),
                                  ("sycophancy", ins.agreement, "agreed")):
        if name in ins.probes:
            summary, probe_rows[name] = probe_rate(answers["policy", name], answers["reference", name], patterns,
                                                   ins.probes[name], label)
            key = {"harmful": "refusal", "benign": "over_refusal", "sycophancy": "sycophancy"}[name]
            res[key] = summary
            if name == "benign":
                for side in ("policy", "reference"):
                    metrics[side]["refusal_benign"] = summary[side]
    if pair_seqs is not None:
        res["preferences"] = preference_stats(scores["pairs_policy"], scores["pairs_reference"], ins.beta)
        metrics["policy"]["preference_accuracy"] = res["preferences"]["accuracy"]
        metrics["policy"]["preference_margin"] = res["preferences"]["margin"]
    if cap_mask is not None:
        nll = {side: nll_per_token(scores[f"capability_{side}"], cap_mask) for side in ("policy", "reference")}
        res["capability"] = {"n": len(ins.capability), "tokens": int(cap_mask.sum()), "nll_policy": nll["policy"],
                             "nll_reference": nll["reference"], "alignment_tax": nll["policy"] - nll["reference"]}
        for side in ("policy", "reference"):
            metrics[side]["capability_nll"] = nll[side]
    res["metrics"] = metrics

    per = {"policy": pol.per_prompt(pol.texts), "reference": ref.per_prompt(ref.texts),
           "policy_kl": pol.per_prompt(kl["per_answer"]), "policy_lengths": pol.per_prompt(mask_pol.sum(-1).int()),
           "reference_lengths": ref.per_prompt(mask_ref.sum(-1).int())}
    if rw_pol is not None:
        per.update(policy_scores=pol.per_prompt(rw_pol), reference_scores=ref.per_prompt(rw_ref))
    if ("check", "prompts") in answers:
        check = answers["check", "prompts"]
        per["reference_check"] = check.per_prompt(check.texts)
        if "reward_check" in scores:
            per["reference_check_scores"] = check.per_prompt(scores["reward_check"])
    res["rows"] = [{"id": p.id, "prompt": p.prompt, **({"category": p.category} if p.category else {}),
                    **{k: v[i] for k, v in per.items()}} for i, p in enumerate(ins.prompts.items)]
    res["samples"] = [{"id": row["id"], "prompt": row["prompt"], "policy": row["policy"][0], "reference": row["reference"][0],
                       **({"policy_score": row["policy_scores"][0], "reference_score": row["reference_scores"][0]}
                          if "policy_scores" in row else {})} for row in res["rows"][:MD_SAMPLES]]
    res["probe_rows"] = probe_rows
    res["notes"] = list(ins.notes)
    return res


def run_judge(ins: EvalInputs, pol: Answers, ref: Answers, log=print, turn2: dict[str, list[str]] | None = None) -> dict:
    """The LLM judge on each prompt's first answers, both orders; a prompt asked a second turn is judged on both
    turns (each model's whole side of the conversation). ``judge.jsonl`` gets a line per prompt as it finishes (its
    verdicts, the judge's texts and the answers)."""
    path = ins.out / "judge.jsonl"
    first_pol, first_ref = [a[0] for a in pol.per_prompt(pol.texts)], [a[0] for a in ref.per_prompt(ref.texts)]
    requests = [p.prompt for p in ins.prompts.items]
    shown_pol, shown_ref = list(first_pol), list(first_ref)
    second = {i: k for k, i in enumerate(ins.second_turns)} if turn2 else {}
    for i, k in second.items():
        turns = ins.prompts.items[i].turns[:2]
        requests[i] = conversation_request(turns)
        shown_pol[i] = conversation_answer(turns, [first_pol[i], turn2["policy"][k]])
        shown_ref[i] = conversation_answer(turns, [first_ref[i], turn2["reference"][k]])
    t = time.perf_counter()
    with open(path, "w") as f:
        def record(rec) -> None:
            extra = ({"policy_turn2": turn2["policy"][second[rec.index]], "reference_turn2": turn2["reference"][second[rec.index]]}
                     if rec.index in second else {})
            f.write(json.dumps({**rec.as_dict(), "policy": first_pol[rec.index], "reference": first_ref[rec.index], **extra},
                               default=str) + "\n")
            f.flush()

        result = judge_pairwise(requests, shown_pol, shown_ref, ins.judge, on_verdict=record,
                                ids=[p.id for p in ins.prompts.items])
    log(f"judged {len(result.records)} prompts in {time.perf_counter() - t:.1f} s"
        + (f" ({len(second)} on both turns)" if second else ""))
    return {**result.summary(), "file": str(path), **({"two_turn_prompts": len(second)} if second else {})}


# ----------------------------------------------------------------------------- outputs


def write_eval(result: dict, out: Path) -> dict[str, str]:
    """eval.json (everything), eval.md (the report) and eval.png (reward and length distributions) in ``out``."""
    paths = {"json": out / "eval.json", "markdown": out / "eval.md", "plot": out / "eval.png"}
    if "judge" in result:
        paths["judge"] = Path(result["judge"]["file"])
    shown = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps({**result, "paths": shown}, indent=1, default=str) + "\n")
    paths["markdown"].write_text(format_eval_markdown(result, max_samples=MD_SAMPLES)
                                 + "".join(f"\n- note: {n}" for n in result.get("notes", [])) + "\n" * bool(result.get("notes")))
    plot_eval(result, paths["plot"])
    return shown


def plot_eval(result: dict, path: Path) -> Path:
    """Histograms, policy against reference: each answer's reward (when a reward scored them) and length in tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    panels = [("response length (tokens)", "policy_lengths", "reference_lengths")]
    if rows and "policy_scores" in rows[0]:
        panels.insert(0, (result.get("scored_by") or "reward", "policy_scores", "reference_scores"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (title, pk, rk) in zip(axes[0], panels):
        pv = [v for row in rows for v in row[pk]]
        rv = [v for row in rows for v in row[rk]]
        lo, hi = min(pv + rv), max(pv + rv)
        bins = torch.linspace(lo, hi if hi > lo else lo + 1, 21).tolist()
        ax.hist(rv, bins=bins, alpha=0.55, label="reference")
        ax.hist(pv, bins=bins, alpha=0.55, label="policy")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("answers")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def format_summary(result: dict) -> str:
    """What ``rlhf-cluster eval`` prints: the headline numbers and where the files are."""
    m = result["metrics"]
    pol, ref = m["policy"], m["reference"]
    lines = [f"eval: {result['policy']} vs {result['reference']}",
             f"prompts: {result['prompts']} ({result['n_prompts']} prompts x {result['samples_per_prompt']} "
             f"sample{'s' if result['samples_per_prompt'] > 1 else ''})"]
    if (w := result.get("win_rate")) is not None:
        lines.append(f"win rate by {result['scored_by']}: {_pct(w['win_rate_ties_half'])} "
                     f"[{_pct(w['ci_low'])}, {_pct(w['ci_high'])}] (95% CI, ties count 1/2; {w['wins']} wins, "
                     f"{w['ties']} ties, {w['losses']} losses)")
        lines.append(f"reward: policy {pol['reward_mean']:+.4f}  reference {ref['reward_mean']:+.4f}")
    if (c := result.get("self_check")) is not None:
        lines.append(f"self-check (reference vs a second sample of itself): {_pct(c['win_rate_ties_half'])} "
                     f"[{_pct(c['ci_low'])}, {_pct(c['ci_high'])}]")
    lines.append(f"KL(policy || reference): {pol['kl_per_token']:.4f} per token, {pol['kl_per_sequence']:.3f} per response; "
                 f"entropy per token: policy {pol['entropy']:.3f}  reference {ref['entropy']:.3f}")
    lines.append(f"length (tokens): policy {pol['length_mean']:.1f}  reference {ref['length_mean']:.1f}; distinct-2: "
                 f"policy {pol['distinct_2']:.3f}  reference {ref['distinct_2']:.3f}")
    for key, what in (("refusal", "refusals of harmful requests"), ("over_refusal", "refusals of benign requests"),
                      ("sycophancy", "sycophancy (agrees with a false claim)")):
        if (s := result.get(key)) is not None:
            lines.append(f"{what}: policy {_pct(s['policy'])}  reference {_pct(s['reference'])}  ({s['n']} prompts of "
                         f"{s['prompts']})")
    if (p := result.get("preferences")) is not None:
        lines.append(f"held-out preferences: accuracy {_pct(p['accuracy'])}, margin {p['margin']:+.4f} "
                     f"(implicit reward, beta {p['beta']:g}, {p['n']} pairs)")
    if (c := result.get("capability")) is not None:
        lines.append(f"capability NLL per token: policy {c['nll_policy']:.4f}  reference {c['nll_reference']:.4f}  "
                     f"(alignment tax {c['alignment_tax']:+.4f}, {c['n']} responses)")
    if (j := result.get("judge")) is not None:
        lines.append(f"judge {j['model']}: policy {j['policy_wins']}, reference {j['reference_wins']}, ties {j['ties']}, "
                     f"invalid {j['invalid']}, errors {j['errors']}; win rate {_pct(j['win_rate'])}")
    lines += [f"note: {n}" for n in result.get("notes", [])]
    lines += [f"{k + ':':10s}{v}" for k, v in result.get("paths", {}).items()]
    return "\n".join(lines)
