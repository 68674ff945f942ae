"""Placement on a simulated multi-node cluster: each role's actors land where the config says."""

import collections
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from rlhf_cluster.cluster.groups import ActorFailure
from rlhf_cluster.cluster.roles import start_roles
from rlhf_cluster.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_cluster():
    """A head with no GPUs plus three nodes declaring 4 GPUs each (Ray only counts them)."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    for _ in range(3):
        cluster.add_node(num_cpus=2, num_gpus=4)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


BASE = ["policy.model_name_or_path=/unused", "reward.model_name_or_path=/unused-rm", "data.train_path=/unused",
        "algorithm.mini_batch_size=16", "policy.micro_batch_size=1", "critic.micro_batch_size=1"]


def _placements(cfg):
    roles = start_roles(cfg)
    try:
        # ~10 actor processes importing torch at once on two cores: a fresh clone's full suite once took >120 s
        # to schedule two of them (alone this module takes 24 s), so allow more than the 120-s default.
        return {g.role: g.placements(timeout_s=360) for g in roles.all()}
    finally:
        roles.shutdown()


def test_roles_land_where_the_config_says(gpu_cluster):
    cfg = load_config(None, [*BASE, "policy.num_nodes=2", "policy.num_gpus_per_node=2", "critic.num_gpus_per_node=2",
                             "rollout.num_engines=2", "cluster.colocate_policy_reference=true"])
    where = _placements(cfg)
    assert {r: len(p) for r, p in where.items()} == {"policy": 4, "critic": 2, "reference": 4, "reward": 1, "rollout": 2}
    pol = where["policy"]
    # 2 nodes × 2 ranks: ranks 0-1 share a node, ranks 2-3 share another one.
    assert pol[0]["node_id"] == pol[1]["node_id"] != pol[2]["node_id"] == pol[3]["node_id"]
    assert all(len(p["gpu_ids"]) == 1 for p in pol)
    assert len({(p["node_id"], p["gpu_ids"][0]) for p in pol}) == 4  # one GPU per rank, none shared
    # Colocated reference replica i shares policy rank i's node (same bundle, a fraction of a GPU).
    assert [p["node_id"] for p in where["reference"]] == [p["node_id"] for p in pol]
    crit = where["critic"]
    assert crit[0]["node_id"] == crit[1]["node_id"]
    # No GPU is promised to two whole-GPU actors: count whole-GPU holders per (node, gpu).
    used = collections.Counter((p["node_id"], g) for r in ("policy", "critic", "reward", "rollout") for p in where[r] for g in p["gpu_ids"])
    assert max(used.values()) == 1
    # The head has no GPUs, so nothing GPU-bound lands there.
    head = gpu_cluster.head_node.node_id
    assert all(p["node_id"] != head for r in where for p in where[r])


def _wait_for_free_gpus(n, timeout_s=30.0):
    import time

    deadline = time.time() + timeout_s
    while ray.available_resources().get("GPU", 0) < n and time.time() < deadline:
        time.sleep(0.5)
    return ray.available_resources().get("GPU", 0)


def test_too_many_gpus_is_refused_before_any_actor_starts(gpu_cluster):
    assert _wait_for_free_gpus(12) == 12  # the previous test's groups were released
    cfg = load_config(None, [*BASE, "policy.num_nodes=2", "policy.num_gpus_per_node=4", "critic.num_gpus_per_node=4",
                             "rollout.num_engines=2"])
    with pytest.raises(ActorFailure, match="the roles need 16 GPUs .* but the cluster has 12"):
        start_roles(cfg)
    assert ray.available_resources().get("GPU") == 12  # nothing was reserved


def test_a_config_that_cannot_fit_in_gpu_memory_is_refused_before_any_actor_starts(gpu_cluster):
    """The plan's estimate against the cluster's GPUs (80 GiB each here): a 7B PPO at ZeRO-2 is refused, naming the
    role, the shortfall and a fix; the same config with that fix passes the check."""
    assert _wait_for_free_gpus(12) == 12
    shapes = REPO / "configs" / "shapes" / "qwen2.5-7b"
    cfg = load_config(None, [f"policy.model_name_or_path={shapes}", "reward.function=rlhf_cluster.rewards:sentiment",
                             "data.train_path=/unused", "algorithm.mini_batch_size=16", "policy.micro_batch_size=1",
                             "critic.micro_batch_size=1", "cluster.gpu_memory_gib=80"])
    with pytest.raises(ActorFailure, match=r"does not fit the cluster's GPUs[\s\S]*policy: needs [\d.]+ GiB per GPU .*short "
                                           r"[\d.]+ GiB\); fits with: .*offload_optimizer=true"):
        start_roles(cfg)
    assert ray.available_resources().get("GPU") == 12  # nothing was reserved
