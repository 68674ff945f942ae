"""Pipelines: stages chained in one YAML, each stage's output feeding the next.

    output_dir: runs/pipeline
    stages:
      - name: sft
        config: configs/sft.yaml
      - name: rm
        config: configs/rm.yaml
        overrides: {policy.model_name_or_path: "${sft.policy}"}
      - name: ppo
        config: configs/ppo_demo.yaml
        overrides:
          policy.model_name_or_path: "${sft.policy}"
          reward.model_name_or_path: "${rm.reward_model}"
          reward.function: null

``${NAME.policy}`` / ``${NAME.reward_model}`` name what an earlier stage writes. Stage NAME
runs in ``output_dir/NAME``. Every stage's config is validated before the first one starts;
command-line overrides address a stage by its name (``ppo.schedule.num_steps=5``).

``data_report: {strict: true}`` (optional) runs ``rlhf-cluster data report`` on every offline
stage's training file (SFT, reward-model, DPO-family data; with its eval file for overlap) before
any stage starts, writing ``output_dir/data_report/NAME/``; with ``strict`` a flagged file stops
the pipeline there, before any actor has started.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from rlhf_cluster.config import ConfigError, RunConfig, load_config

_REF = re.compile(r"\$\{([A-Za-z0-9_-]+)\.(policy|reward_model)\}")
_KNOWN = {"output_dir", "stages", "data_report"}
_REPORT_KEYS = {"strict"}
_STAGE_KEYS = {"name", "config", "overrides"}


@dataclass
class Stage:
    name: str
    config: RunConfig
    produced_inputs: set[str]  # config paths that earlier stages will create


def is_pipeline(path: str | Path) -> bool:
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(tree, dict) and "stages" in tree


def load_pipeline(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> list[Stage]:
    p = Path(path)
    tree = yaml.safe_load(p.read_text()) or {}
    unknown = set(tree) - _KNOWN
    if unknown:
        raise ConfigError(f"pipeline {p}: unknown top-level keys {sorted(unknown)}; a pipeline has only {sorted(_KNOWN)}")
    out_root = Path(os.path.abspath(tree.get("output_dir") or "runs/pipeline"))  # actors never see relative paths
    stages_raw = tree.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"pipeline {p}: 'stages' must be a non-empty list of {{name, config, overrides}}")
    names = [s.get("name") if isinstance(s, dict) else None for s in stages_raw]
    for i, s in enumerate(stages_raw):
        if not isinstance(s, dict) or not s.get("name") or not s.get("config"):
            raise ConfigError(f"pipeline {p}: stage {i + 1} needs a 'name' and a 'config'")
        extra = set(s) - _STAGE_KEYS
        if extra:
            raise ConfigError(f"pipeline {p}: stage {s['name']!r} has unknown keys {sorted(extra)}; allowed: {sorted(_STAGE_KEYS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"pipeline {p}: stage names must be unique, got {names}")
    by_stage: dict[str, list[str]] = {n: [] for n in names}
    for text in overrides:
        head, _, rest = text.partition(".")
        if head not in by_stage or not rest:
            raise ConfigError(f"pipeline override {text!r} must start with a stage name ({', '.join(names)}), "
                              f"e.g. {names[-1]}.schedule.num_steps=5")
        by_stage[head].append(rest)

    stages: list[Stage] = []
    outputs: dict[str, dict[str, str]] = {}
    for s in stages_raw:
        name = s["name"]
        cfg_path = Path(s["config"])
        if not cfg_path.is_absolute() and not cfg_path.exists():
            cfg_path = p.parent / cfg_path
        produced: set[str] = set()
        items = []
        for key, value in (s.get("overrides") or {}).items():
            if isinstance(value, str):
                value = _resolve(value, outputs, name, produced)
            items.append(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
        stage_dir = out_root / name
        cfg = load_config(cfg_path, [*items, f"output_dir={stage_dir}", *by_stage[name]])
        sub = {"sft": "policy", "dpo": "policy", "ppo": "policy", "online_dpo": "policy", "rm": "reward_model"}[cfg.method]
        outputs[name] = {sub: str(stage_dir / sub)}
        stages.append(Stage(name, cfg, produced))
    return stages


def _resolve(value: str, outputs: dict[str, dict[str, str]], stage: str, produced: set[str]) -> str:
    def sub(m: re.Match) -> str:
        src, what = m.group(1), m.group(2)
        if src not in outputs:
            raise ConfigError(f"stage {stage!r}: ${{{src}.{what}}} names no earlier stage (earlier: {sorted(outputs) or 'none'})")
        if what not in outputs[src]:
            raise ConfigError(f"stage {stage!r}: stage {src!r} writes {sorted(outputs[src])}, not {what!r}")
        produced.add(outputs[src][what])
        return outputs[src][what]

    return _REF.sub(sub, value)


@dataclass(frozen=True)
class DataReportStage:
    """``data_report:`` of a pipeline: where the reports go and whether a flag stops the pipeline."""

    out_dir: Path
    strict: bool = True


def load_data_report(path: str | Path) -> DataReportStage | None:
    """The pipeline's ``data_report`` entry, checked (``None`` when it has none)."""
    tree = yaml.safe_load(Path(path).read_text()) or {}
    spec = tree.get("data_report")
    if spec is None or spec is False:
        return None
    if spec is True:
        spec = {}
    if not isinstance(spec, dict) or set(spec) - _REPORT_KEYS or not isinstance(spec.get("strict", True), bool):
        raise ConfigError(f"pipeline {path}: data_report must be true or a mapping {{strict: true|false}}, got {spec!r}")
    root = Path(os.path.abspath(tree.get("output_dir") or "runs/pipeline"))
    return DataReportStage(root / "data_report", spec.get("strict", True))


def report_stage_data(stages: list[Stage], spec: DataReportStage, log=print) -> dict:
    """The data report on every offline stage's training file; with ``spec.strict``, a flagged file is a
    :class:`ConfigError` naming the stage, the flags and the report (nothing has started yet)."""
    from rlhf_cluster.models import load_tokenizer
    from rlhf_cluster.quality.data_report import format_summary, report_for_stage, write_report

    first = stages[0].config.policy.model_name_or_path
    results, flagged = {}, []
    for st in stages:
        cfg = st.config
        if cfg.method not in ("sft", "rm", "dpo"):
            continue  # prompt-only data (online methods): nothing pairwise to check
        path = cfg.policy.model_name_or_path
        name = first if path in st.produced_inputs else path
        report = report_for_stage(cfg.data, load_tokenizer(name), name)
        paths = write_report(report, spec.out_dir / st.name)
        log(f"--- data report, stage {st.name}:\n{format_summary(report)}\nreport: {paths[0]}")
        results[st.name] = {"report": str(paths[0]), "flags": [f["name"] for f in report["flags"]]}
        if report["flags"]:
            flagged.append(f"stage {st.name!r} ({cfg.data.train_path}): {', '.join(results[st.name]['flags'])} "
                           f"(see {paths[0]})")
    if flagged and spec.strict:
        raise ConfigError("the data report flagged " + "; ".join(flagged) + ". Fix the data, or set "
                          "data_report: {strict: false} in the pipeline to train on it anyway")
    return results


def run_pipeline(stages: list[Stage], run_stage, log=print, overwrite: bool = False,
                 data_report: DataReportStage | None = None) -> dict:
    """Check every stage's files up front (skipping what earlier stages will write), then run in order.

    A stage whose output_dir holds a previous run is refused up front, unless ``overwrite``: then every stage's
    previous outputs are removed once all checks passed, before the first stage starts.
    """
    from rlhf_cluster.config import preflight
    from rlhf_cluster.drivers.common import check_output_dir, clear_output_dir

    if not overwrite:
        for st in stages:
            check_output_dir(st.config.output_dir, can_resume=False)
    for st in stages:
        preflight(st.config, frozenset(st.produced_inputs))
    check_stage_data(stages, log)
    results = {}
    if data_report is not None:
        log("\n=== data report (before any stage starts)")
        results["data_report"] = report_stage_data(stages, data_report, log)
    if overwrite:
        for st in stages:
            clear_output_dir(st.config.output_dir, log)
    for i, st in enumerate(stages, 1):
        log(f"\n=== stage {i}/{len(stages)}: {st.name} ({st.config.method}) -> {st.config.output_dir}")
        results[st.name] = run_stage(st.config)
    return results


def check_stage_data(stages: list[Stage], log=print) -> None:
    """Every stage's data read, checked row by row and tokenized now, before the first stage starts any actor, so
    a bad row in the last stage's file does not surface after the first stages have trained. A stage whose model an
    earlier stage writes is tokenized with the first stage's tokenizer (a pipeline carries its tokenizer along)."""
    from rlhf_cluster.drivers.offline import load_stage_data, stage_for
    from rlhf_cluster.drivers.rl import load_probes, load_prompts
    from rlhf_cluster.models import load_tokenizer

    first = stages[0].config.policy.model_name_or_path
    quiet = lambda _: None  # each stage reports its data again when it runs
    for st in stages:
        cfg = st.config
        path = cfg.policy.model_name_or_path
        tokenizer = load_tokenizer(first if path in st.produced_inputs else path)
        if cfg.method in ("ppo", "online_dpo"):
            load_prompts(cfg, tokenizer, quiet)
            load_probes(cfg, tokenizer, quiet)
        else:
            load_stage_data(cfg, stage_for(cfg), tokenizer, quiet)
    log(f"data of all {len(stages)} stages checked")
