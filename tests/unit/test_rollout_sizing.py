from rlhf_cluster.workers.rollout import kv_cache_bytes


def test_kv_cache_holds_the_batch_in_whole_blocks():
    """2 (keys, values) · 4 layers · 2 kv heads · 64 dims · 4 bytes = 4 KiB per token; 48 tokens round up to one
    128-token block, 200 tokens to two; room for 5/4 of the rows plus 2."""
    cfg = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 256}
    assert kv_cache_bytes(cfg, 48, rows=32, elem_bytes=4) == 4096 * 128 * 42
    assert kv_cache_bytes({**cfg, "head_dim": 32}, 200, rows=3, elem_bytes=2) == (2 * 4 * 2 * 32 * 2) * 256 * 5
    assert kv_cache_bytes({k: v for k, v in cfg.items() if k != "num_key_value_heads"}, 1, rows=0, elem_bytes=4) == 8192 * 128 * 3
