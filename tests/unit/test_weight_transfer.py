"""The gloo weight-transfer backend: its transport between two ranks, its pure parts, and how it is chosen."""

import socket
import threading

import pytest
import torch

from rlhf_cluster.config import load_config
from rlhf_cluster.workers.broadcast import (
    Meta,
    bucket_plan,
    dtype_name,
    join_group,
    layer_runs,
    receive_buckets,
    send_buckets,
)
from rlhf_cluster.workers.weight_transfer import (
    GlooWeightTransferUpdateInfo,
    TrainerWeightSource,
    trainer_init_info,
)


def test_bucket_plan_cuts_at_size_and_dtype_changes():
    #            0   1   2   3    4   5
    numels = [10, 20, 30, 100, 5, 5]
    dtypes = ["float32", "float32", "float32", "float32", "bfloat16", "bfloat16"]
    sizes = [4, 4, 4, 4, 2, 2]
    # 40 + 80 bytes fit in 128; +120 would not; 400 travels alone; the dtype change cuts.
    assert bucket_plan(numels, dtypes, sizes, 128) == [range(0, 2), range(2, 3), range(3, 4), range(4, 6)]


def test_bucket_plan_covers_every_tensor_once_in_order():
    g = torch.Generator().manual_seed(0)
    numels = torch.randint(1, 500, (200,), generator=g).tolist()
    dtypes = ["float32" if x % 3 else "bfloat16" for x in torch.randint(0, 9, (200,), generator=g).tolist()]
    sizes = [4 if d == "float32" else 2 for d in dtypes]
    plan = bucket_plan(numels, dtypes, sizes, 1000)
    assert [i for r in plan for i in r] == list(range(200))
    for r in plan:
        assert len({dtypes[i] for i in r}) == 1
        assert len(r) == 1 or sum(numels[i] * sizes[i] for i in r) <= 1000


def test_bucket_plan_empty():
    assert bucket_plan([], [], [], 10) == []


def test_layer_runs_group_consecutive_names_of_one_layer():
    names = ["model.embed.weight", "model.layers.0.a", "model.layers.0.b", "model.layers.1.a", "model.layers.10.a",
             "model.norm.weight", "lm_head.weight"]
    assert layer_runs(names) == [["model.embed.weight"], ["model.layers.0.a", "model.layers.0.b"], ["model.layers.1.a"],
                                 ["model.layers.10.a"], ["model.norm.weight"], ["lm_head.weight"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("bucket_bytes", [1, 300, 1 << 20])  # one tensor per bucket, a few per bucket, all in one
def test_broadcast_delivers_every_tensor_exactly(bucket_bytes):
    g = torch.Generator().manual_seed(0)
    sent = [("a", torch.randn(3, 5, generator=g)), ("b", torch.randn(7, generator=g)),
            ("c", torch.randn(4, 4, generator=g).to(torch.bfloat16)), ("d", torch.randn(2, 3, generator=g).to(torch.bfloat16)),
            ("e", torch.randn(1, generator=g)), ("f", torch.randn(30, 2, generator=g).t())]  # non-contiguous
    meta = [Meta(n, t.dtype, tuple(t.shape)) for n, t in sent]
    port, got, errors = _free_port(), [], []

    def receiver():
        try:
            _, group = join_group("127.0.0.1", port, 1, 2, timeout_s=60)
            receive_buckets(group, [m.name for m in meta], [dtype_name(m.dtype) for m in meta], [list(m.shape) for m in meta],
                            bucket_bytes, lambda pairs: got.extend((n, t.clone()) for n, t in pairs))
        except Exception as e:  # surfaced below
            errors.append(e)

    th = threading.Thread(target=receiver)
    th.start()
    _, group = join_group("127.0.0.1", port, 0, 2, timeout_s=60)
    nbytes = send_buckets(group, sent, meta, bucket_bytes)
    th.join(60)
    assert not errors, errors
    assert [n for n, _ in got] == [n for n, _ in sent]
    for (_, a), (_, b) in zip(sent, got):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert nbytes == sum(t.numel() * t.element_size() for _, t in sent)


def test_send_refuses_a_source_that_disagrees_with_its_metadata():
    with pytest.raises(ValueError, match="declared 'x'"):
        send_buckets(None, [("y", torch.zeros(2))], [Meta("x", torch.float32, (2,))], 1 << 20)


def test_update_info_rejects_mismatched_metadata():
    with pytest.raises(ValueError, match="2 names, 1 dtypes"):
        GlooWeightTransferUpdateInfo(names=["a", "b"], dtype_names=["float32"], shapes=[[1], [2]])


def test_weight_source_metadata_matches_iteration():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    src = TrainerWeightSource(m, zero3=False)
    meta = src.metadata()
    pairs = list(src)
    assert [x.name for x in meta] == [n for n, _ in pairs] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert [x.shape for x in meta] == [tuple(t.shape) for _, t in pairs]


def test_trainer_init_info_per_backend():
    info = trainer_init_info("gloo", rank=0, master_address="h", master_port=1, world_size=3, bucket_bytes=7)
    assert info.backend == "gloo" and info.is_sender and info.bucket_bytes == 7
    assert not trainer_init_info("gloo", rank=1, master_address="h", master_port=1, world_size=3).is_sender
    with pytest.raises(ValueError, match="object_store"):
        trainer_init_info("object_store", rank=0, master_address="h", master_port=1, world_size=2)


def test_nccl_weight_sync_on_a_cpu_cluster_is_refused_up_front(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("policy: {model_name_or_path: /m}\ndata: {train_path: /d.jsonl}\nreward: {function: 'a:b'}\n")
    with pytest.raises(ValueError, match="weight_sync=nccl needs GPUs"):
        load_config(cfg, ["rollout.weight_sync=nccl", "cluster.device=cpu"])
    with pytest.raises(ValueError, match="weight_sync"):
        load_config(cfg, ["rollout.weight_sync=broadcast"])
    assert load_config(cfg, []).rollout.weight_sync == "auto"


def test_the_vllm_plugin_registers_gloo_in_both_factories():
    from importlib.metadata import entry_points

    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    assert "rlhf_cluster" in {e.name for e in entry_points(group="vllm.general_plugins")}
    from rlhf_cluster import vllm_plugin

    vllm_plugin.register()
    vllm_plugin.register()  # vLLM may load plugins more than once per process
    assert WeightTransferEngineFactory._registry["gloo"]().__name__ == "GlooWeightTransferEngine"
    assert WeightTransferTrainerFactory._registry["gloo"]().__name__ == "GlooTrainerWeightTransferEngine"


class _FailingEngines:
    """A weight-sync client whose engines reject the update (what a broken engine does): the sender must not wait."""

    def __init__(self, fail_at: str):
        self.fail_at = fail_at

    def init_weight_transfer_engine(self, init_info):
        if self.fail_at == "init":
            raise ValueError("engine refused the transfer group")
        from rlhf_cluster.workers.broadcast import join_group

        self.store, self.group = join_group(init_info["master_address"], init_info["master_port"], 1, 2, 60)

    def start_weight_update(self):
        pass

    def update_weights(self, update_info):
        raise ValueError("engine refused the update")

    def finish_weight_update(self, weight_version=None):
        pass


@pytest.mark.parametrize("fail_at", ["init", "update"])
def test_an_engine_failure_surfaces_at_once_instead_of_after_the_group_timeout(fail_at):
    import time

    from rlhf_cluster.workers.weight_transfer import GlooTrainerWeightTransferEngine

    m = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    info = trainer_init_info("gloo", rank=0, master_address="127.0.0.1", master_port=_free_port(), world_size=2,
                             bucket_bytes=64 * 64 * 4)
    info.timeout_s = 10  # the rendezvous thread left behind by a failed init ends by then
    t = time.perf_counter()
    with pytest.raises(RuntimeError) as err:
        engine = GlooTrainerWeightTransferEngine.trainer_init(info, client=_FailingEngines(fail_at),
                                                              source=TrainerWeightSource(m, zero3=False))
        engine.send_weights()
    assert time.perf_counter() - t < 30
    assert "engine refused" in str(err.value.__cause__)
