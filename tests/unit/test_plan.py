"""The memory plan: exact parameter counts, hand-computed model states, placement, vLLM KV room,
problems whose suggested fix the plan then confirms, and the table on the published shapes."""

import pytest
import torch

from rlhf_cluster.cluster.layout import RoleSpec
from rlhf_cluster.config import load_config
from rlhf_cluster.plan import (
    GiB,
    ModelShape,
    activation_bytes,
    build_plan,
    engine_memory,
    model_states,
    num_params,
    param_numels,
    place,
    zero3_partition_numel,
)

SHAPES = "configs/shapes"
QWEN7 = f"{SHAPES}/qwen2.5-7b"


def _cfg(model=QWEN7, *overrides):
    paths = [f"{role}.model_name_or_path={model}" for role in ("policy", "critic", "reference")]
    return load_config("configs/ppo_demo.yaml", [*paths, *overrides])


# ----------------------------------------------------------------------------- parameter counts


def _tiny_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    base = dict(vocab_size=503, hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=2)
    return {
        "llama-untied": LlamaConfig(**base, tie_word_embeddings=False),
        "llama-tied-bias": LlamaConfig(**base, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
        "llama-head-dim": LlamaConfig(**base, head_dim=32),
        "qwen2-untied": Qwen2Config(**base, tie_word_embeddings=False),
        "qwen2-tied": Qwen2Config(**base, tie_word_embeddings=True),
        "mistral": MistralConfig(**base, tie_word_embeddings=False),
    }


@pytest.mark.parametrize("name", list(_tiny_configs()))
@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_param_count_is_exact(name, head):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = _tiny_configs()[name]
    shape = ModelShape.from_config(cfg.to_dict())
    torch.manual_seed(0)
    if head == "lm":
        model = AutoModelForCausalLM.from_config(cfg)
    else:
        cfg.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(cfg)
    assert num_params(shape, head) == sum(p.numel() for p in model.parameters())
    assert sorted(param_numels(shape, head)) == sorted(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,published", [("qwen2.5-0.5b", 494_032_768), ("qwen2.5-7b", 7_615_616_512),
                                            ("llama-3-8b", 8_030_261_248), ("llama-3-70b", 70_553_706_496)])
def test_shapes_match_published_counts(name, published):
    assert num_params(ModelShape.from_dir(f"{SHAPES}/{name}")) == published


def test_real_shape_on_meta_device():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(f"{SHAPES}/qwen2.5-0.5b")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert num_params(ModelShape.from_dir(f"{SHAPES}/qwen2.5-0.5b")) == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- model states by hand


def test_zero0_fp32_is_torch_adamw_alone():
    ms = model_states(1000, zero_stage=0, dp=4, dtype_bytes=4, num_tensors=3, largest_tensor=600)
    # weights 4P + grads 4P + exp_avg, exp_avg_sq 8P + one float32 step counter per tensor; N does not matter
    assert (ms.params, ms.grads_at_step, ms.optimizer) == (4000, 4000, 8000 + 12)
    assert ms.at_step == 16_012


def test_zero0_bf16_adds_fp32_masters_and_fp32_grads():
    ms = model_states(1000, zero_stage=0, dp=1, dtype_bytes=2, num_tensors=3, largest_tensor=600)
    assert (ms.params, ms.optimizer, ms.grads_at_step) == (2000, 4000 + 8000 + 12, 2000 + 4000)


def test_zero2_bf16_partition_and_bucket():
    # P = 1001 over 4 ranks: the flat buffer pads to a multiple of 2·4 = 8 -> 1008, partitions of 252
    ms = model_states(1001, zero_stage=2, dp=4, dtype_bytes=2, largest_tensor=500)
    assert ms.params == 2 * 1008
    assert ms.optimizer == 12 * 252 + 4  # fp32 master + exp_avg + exp_avg_sq, one step counter
    assert ms.grads_at_step == 4 * 252 and ms.buffers_at_step == 0
    assert ms.grads_in_backward == 2 * 252 + 2 * 500  # contiguous partition + one tensor's full gradient in flight
    assert ms.buffers_in_backward == 2 * 500_000_000  # the reduce bucket, whatever the model's size
    assert model_states(1001, zero_stage=2, dp=4, dtype_bytes=2, largest_tensor=500,
                        grad_accum_steps=2).grads_in_backward == 2 * 2 * 252 + 2 * 500


def test_zero1_keeps_every_gradient_through_backward():
    ms = model_states(1000, zero_stage=1, dp=4, dtype_bytes=2, largest_tensor=500)
    assert ms.grads_in_backward == 2 * 1000 + 2 * 250


def test_zero3_per_tensor_padding_and_fp32_clone():
    numels = [10, 990]
    assert zero3_partition_numel(numels, 4) == 3 + 248
    ms = model_states(1000, zero_stage=3, dp=4, dtype_bytes=4, zero3_partition=251, largest_tensor=990)
    # fp32 still gets a master clone (stage3.py's alias test compares a torch.device with a string)
    assert ms.params == 4 * 251 and ms.optimizer == 12 * 251 + 4
    assert ms.grads_at_step == 4 * 251 + 4 * 251  # partition buffer + the sub-group's fp32 gradient
    assert ms.buffers_at_step == 4 * 500_000_000  # the reduce bucket ZeRO-3 keeps allocated


def test_offload_moves_optimizer_to_host():
    gpu = model_states(8000, zero_stage=3, dp=2, dtype_bytes=2, largest_tensor=1000)
    off = model_states(8000, zero_stage=3, dp=2, dtype_bytes=2, largest_tensor=1000, offload_optimizer=True)
    both = model_states(8000, zero_stage=3, dp=2, dtype_bytes=2, largest_tensor=1000, offload_optimizer=True,
                        offload_params=True)
    assert off.optimizer == 0 and off.grads_at_step == 0 and off.params == gpu.params
    assert off.host == 16 * 4000 + 4 + 2 * 4000 + 8 * 4000  # masters, fp32 grads, Adam; grad partition; AdamW temps
    assert both.params == 0 and both.host == off.host + 2 * 4000


def test_peak_picks_the_larger_moment():
    ms = model_states(10**9, zero_stage=2, dp=8, dtype_bytes=2, largest_tensor=10**8)
    assert ms.peak(0)[1] == "backward"  # the 1 GB reduce bucket beats the 8 bytes/param step temporaries
    assert ms.peak(10**11) == (ms.params + ms.optimizer + ms.grads_in_backward + ms.buffers_in_backward + 10**11, "backward")


# ----------------------------------------------------------------------------- activations


def test_activations_checkpointing_and_vocab_term():
    shape = ModelShape.from_dir(f"{SHAPES}/qwen2.5-0.5b")
    kw = dict(batch=4, seq_len=1024, response_len=512, dtype_bytes=2)
    stack = activation_bytes(shape, checkpointing=False, head="scalar", **kw)
    stack_ckpt = activation_bytes(shape, checkpointing=True, head="scalar", **kw)
    lm_ckpt = activation_bytes(shape, checkpointing=True, **kw)
    assert stack_ckpt < stack / 5  # 24 layers' inputs plus one layer, instead of 24 layers
    assert lm_ckpt - stack_ckpt > stack_ckpt  # a 152k vocabulary's logits outweigh the whole checkpointed stack


# ----------------------------------------------------------------------------- vLLM


def test_engine_kv_room_by_hand():
    shape = ModelShape.from_dir(QWEN7)
    m = engine_memory(shape, gpu_bytes=80 * GiB, gpu_memory_utilization=0.5, tensor_parallel_size=1, dtype_bytes=2,
                      max_num_batched_tokens=16384, max_num_seqs=1024)
    assert m.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2
    assert m.weights == 7_615_616_512 * 2
    assert m.kv_tokens == (40 * GiB - m.weights - m.activations) // m.kv_bytes_per_token
    tp8 = engine_memory(shape, gpu_bytes=80 * GiB, gpu_memory_utilization=0.5, tensor_parallel_size=8, dtype_bytes=2,
                        max_num_batched_tokens=16384, max_num_seqs=1024)
    assert tp8.kv_bytes_per_token == 2 * 28 * 1 * 128 * 2  # 4 KV heads over 8 GPUs: one (replicated) head each


def test_too_little_kv_is_a_problem_with_a_working_fix():
    plan = build_plan(_cfg(QWEN7, "rollout.gpu_memory_utilization=0.2", "policy.offload_optimizer=true",
                           "critic.offload_optimizer=true"), nodes=1, gpus_per_node=8, gpu_memory_gib=80)
    (kv,) = [p for p in plan.issues if p.role == "rollout"]
    assert "rollout" in kv.message and "max_model_len 48" in kv.message and "short" in kv.message
    fix = next(f for f in kv.fixes if f.fits)
    again = build_plan(_cfg(QWEN7, "rollout.gpu_memory_utilization=0.2", "policy.offload_optimizer=true",
                            "critic.offload_optimizer=true", *fix.override.split()),
                       nodes=1, gpus_per_node=8, gpu_memory_gib=80)
    assert again.fits, again.format()


# ----------------------------------------------------------------------------- placement


def test_colocation_sums_on_one_gpu():
    cfg = _cfg(f"{SHAPES}/qwen2.5-0.5b", "policy.num_gpus_per_node=4", "cluster.colocate_policy_reference=true",
               "algorithm.mini_batch_size=64")
    plan = build_plan(cfg, nodes=1, gpus_per_node=8, gpu_memory_gib=80)
    rows = {r.role: r for r in plan.rows}
    assert rows["reference"].gpus == rows["policy"].gpus == tuple(((0, i),) for i in range(4))
    assert [role for role, _ in plan.gpu_load[(0, 0)]] == ["policy", "reference"]
    assert sum(b for _, b in plan.gpu_load[(0, 0)]) == rows["policy"].total + rows["reference"].total
    assert rows["reward"].gpus == ((),)  # a rule reward runs on CPU
    assert plan.fits, plan.format()


def test_multi_node_roles_spread_over_distinct_nodes():
    specs = {"policy": RoleSpec("policy", 2, 4), "critic": RoleSpec("critic", 1, 4),
             "rollout": RoleSpec("rollout", 1, 2, gpus_per_actor=2.0)}
    gpus, problems = place(specs, nodes=2, gpus_per_node=8)
    assert not problems
    assert gpus["policy"] == [((0, i),) for i in range(4)] + [((1, i),) for i in range(4)]
    assert gpus["critic"] == [((0, i),) for i in range(4, 8)]  # PACKed on the first node with room
    assert gpus["rollout"] == [((1, 4), (1, 5)), ((1, 6), (1, 7))]  # one engine = tp GPUs


def test_more_gpus_than_the_cluster_has_is_refused():
    cfg = _cfg(f"{SHAPES}/qwen2.5-0.5b", "policy.num_gpus_per_node=8", "critic.num_gpus_per_node=4",
               "policy.micro_batch_size=2", "critic.micro_batch_size=2")
    plan = build_plan(cfg, nodes=1, gpus_per_node=8, gpu_memory_gib=80)
    assert not plan.fits
    assert any("need 14 GPUs" in p and "has 8" in p for p in plan.problems), plan.problems
    assert any(p.startswith("critic:") for p in plan.problems)  # the first role that found no room
    _, problems = place({"policy": RoleSpec("policy", 3, 1)}, nodes=2, gpus_per_node=8)
    assert problems and "spans 3 nodes" in problems[0]
    _, problems = place({"rollout": RoleSpec("rollout", 1, 4, gpus_per_actor=4.0)}, nodes=4, gpus_per_node=8)
    assert problems and "16 GPUs" in problems[0]


# ----------------------------------------------------------------------------- problems and fixes


def test_memory_problem_names_role_gpu_shortfall_and_a_fix_that_fits():
    cfg = _cfg(QWEN7)
    plan = build_plan(cfg, nodes=1, gpus_per_node=8, gpu_memory_gib=80)
    (prob,) = [p for p in plan.issues if p.role == "policy"]
    total = sum(b for _, b in plan.gpu_load[(0, 0)])
    assert prob.message.startswith(f"policy: needs {total / GiB:.1f} GiB per GPU on n0:0, has 80 GiB "
                                   f"(short {(total - 80 * GiB) / GiB:.1f} GiB)")
    fitting = [f for f in prob.fixes if f.fits]
    assert fitting and all(f.need <= 80 * GiB for f in fitting)
    assert prob.fixes[: len(fitting)] == tuple(fitting)  # the ones that fit come first
    for fix in fitting:
        after = build_plan(_cfg(QWEN7, *fix.override.split()), nodes=1, gpus_per_node=8, gpu_memory_gib=80)
        assert not [p for p in after.issues if p.role == "policy"], (fix, after.format())
        assert sum(b for _, b in after.gpu_load[(0, 0)]) == fix.need


def test_model_shapes_can_be_given():
    shape = ModelShape.from_dir(f"{SHAPES}/llama-3-8b")
    cfg = load_config("configs/ppo_demo.yaml", ["policy.model_name_or_path=/nowhere"])
    plan = build_plan(cfg, nodes=1, gpus_per_node=8, gpu_memory_gib=80,
                      model_shapes={"policy": shape, "critic": shape, "reference": shape})
    assert {r.role: r.params for r in plan.rows}["policy"] == 8_030_261_248


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen2.5-7b", "llama-3-8b", "llama-3-70b"])
def test_format_on_the_shapes(name):
    cfg = _cfg(f"{SHAPES}/{name}", "policy.zero_stage=3", "critic.zero_stage=3")
    text = build_plan(cfg, nodes=2, gpus_per_node=8, gpu_memory_gib=80).format()
    lines = text.splitlines()
    assert lines[1].split()[:4] == ["role", "ranks", "placement", "params"]
    assert {line.split()[0] for line in lines[2:7]} == {"policy", "critic", "reference", "reward", "rollout"}
    assert any(line.startswith("verdict: ") for line in lines)
