"""Which roles a run starts and what each asks of the cluster: pure, no Ray.

``role_layout(cfg)`` is the one place that turns a config into role specs; the actor
groups (:mod:`rlhf_cluster.cluster.groups`) place them, and ``rlhf-cluster plan``
(:mod:`rlhf_cluster.plan`) estimates their memory without starting anything.
"""

from __future__ import annotations

from dataclasses import dataclass

# A colocated guest takes this share of each host GPU; the host keeps the rest.
GUEST_GPU_FRACTION = 0.25


@dataclass(frozen=True)
class RoleSpec:
    """What one role asks of the cluster.

    ``num_nodes × per_node`` actors; each takes ``gpus_per_actor`` GPUs (1 for a trainer
    rank or scorer replica, the tensor-parallel size for a vLLM engine, 0 for a rule
    reward) times ``gpu_fraction`` (below 1 when two roles share GPUs). ``host`` names the
    role whose placement group a colocated guest shares (rank i on host rank i's GPU).
    """

    role: str
    num_nodes: int
    per_node: int
    gpus_per_actor: float = 1.0
    gpu_fraction: float = 1.0
    host: str | None = None

    @property
    def size(self) -> int:
        return self.num_nodes * self.per_node


def role_layout(cfg) -> dict[str, RoleSpec]:
    """Every role ``cfg`` starts, in start order, with colocation applied.

    PPO family and online DPO: policy, critic (GAE only), reference (unless the loss is
    reference-free), reward, rollout. Offline stages: the trained model (``policy``, or
    ``reward_model`` for the RM stage) and, for the DPO family, the reference.
    """
    c = cfg.cluster
    specs: dict[str, RoleSpec] = {}
    if cfg.method in ("ppo", "online_dpo"):
        specs["policy"] = RoleSpec("policy", cfg.policy.num_nodes, cfg.policy.num_gpus_per_node)
        if cfg.needs_critic:
            specs["critic"] = RoleSpec("critic", cfg.critic.num_nodes, cfg.critic.num_gpus_per_node)
        if cfg.needs_reference:
            specs["reference"] = RoleSpec("reference", cfg.reference.num_nodes, cfg.reference.num_gpus_per_node)
        specs["reward"] = RoleSpec("reward", cfg.reward.num_nodes, cfg.reward.num_gpus_per_node,
                                   gpus_per_actor=1.0 if cfg.reward.kind == "model" else 0.0)
        r = cfg.rollout
        specs["rollout"] = RoleSpec("rollout", 1, r.num_engines, gpus_per_actor=float(r.tensor_parallel_size))
        if c.colocate_policy_reference and "reference" in specs:
            _colocate(specs, guest="reference", host="policy")
        if c.colocate_critic_reward and "critic" in specs and cfg.reward.kind == "model":
            _colocate(specs, guest="reward", host="critic")
    else:
        name = "reward_model" if cfg.method == "rm" else "policy"
        specs[name] = RoleSpec(name, cfg.policy.num_nodes, cfg.policy.num_gpus_per_node)
        if cfg.needs_reference:
            specs["reference"] = RoleSpec("reference", cfg.reference.num_nodes, cfg.reference.num_gpus_per_node)
    return specs


def _colocate(specs: dict[str, RoleSpec], guest: str, host: str) -> None:
    h = specs[host]
    specs[host] = RoleSpec(h.role, h.num_nodes, h.per_node, h.gpus_per_actor, 1.0 - GUEST_GPU_FRACTION)
    specs[guest] = RoleSpec(guest, h.num_nodes, h.per_node, 1.0, GUEST_GPU_FRACTION, host=host)


def gpu_demand(specs: dict[str, RoleSpec]) -> float:
    """Whole GPUs the roles reserve (a colocated guest shares its host's)."""
    return sum(s.size * s.gpus_per_actor for s in specs.values() if s.host is None)
