"""The tiny-model factory writes ordinary HF directories that the real loaders accept."""

import pytest
import torch

from rlhf_cluster.models import load_causal_lm, load_scalar_model, load_tokenizer, sequence_scores, token_values
from rlhf_cluster.rewards import sentiment
from rlhf_cluster.tiny import build_tiny_model


def test_tiny_models_are_deterministic_and_loadable(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again")
    a, b = load_causal_lm(tiny_model_dir), load_causal_lm(again)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    assert a.config.hidden_size // a.config.num_attention_heads == 64  # vLLM CPU kernels need head_dim 64
    tok = load_tokenizer(tiny_model_dir)
    assert (tiny_model_dir / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()
    text = tok.apply_chat_template([{"role": "user", "content": "describe the cat"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>describe the cat</s><|assistant|>"
    assert tok.decode(tok("the cat is very good").input_ids) == "the cat is very good"


def test_scalar_model_values_and_scores(tmp_path):
    path = build_tiny_model(tmp_path / "rm", kind="scalar", seed=1)
    m = load_scalar_model(path)
    ids = torch.tensor([[0, 0, 7, 8, 9, 10], [0, 5, 6, 7, 8, 0]])
    attn = (torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]]))
    v = token_values(m, ids, attn, num_actions=3)
    assert v.shape == (2, 3)
    s = sequence_scores(m, ids, attn)
    # The score is the head at the last real token: row 0 position 5, row 1 position 4.
    from rlhf_cluster.models import position_ids
    h = m.model(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn)).last_hidden_state
    assert torch.allclose(s, torch.stack([m.score(h[0, 5]), m.score(h[1, 4])]).squeeze(-1), atol=1e-6)


def test_causal_lm_dir_loads_as_scalar_model(tiny_model_dir):
    m = load_scalar_model(tiny_model_dir)  # critic initialised from a policy checkpoint
    assert m.score.out_features == 1


def test_sentiment_reward():
    assert sentiment(["p"] * 4, ["good great", "bad day", "", "good bad cat x"]) == [1.0, -0.5, 0.0, 0.0]


def test_left_align_moves_leading_padding_to_the_end():
    from rlhf_cluster.models import left_align

    ids = torch.tensor([[0, 0, 7, 8, 9, 0], [5, 6, 7, 8, 9, 10], [0, 4, 5, 0, 0, 0]])
    attn = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]])
    a_ids, a_attn, lead = left_align(ids, attn)
    assert lead.tolist() == [2, 0, 1]
    assert a_ids.tolist() == [[7, 8, 9, 0, 0, 0], [5, 6, 7, 8, 9, 10], [4, 5, 0, 0, 0, 0]]
    assert a_attn.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]


def test_padded_batch_forwards_equal_each_row_alone(tiny_model_dir, tmp_path):
    """Log-probs and values of a [left-padded prompt | right-padded response] batch equal a naive per-row loop."""
    from rlhf_cluster.experience import build_experience
    from rlhf_cluster.models import action_logprobs_and_entropy

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 700, (n,), generator=g).tolist() for n in (2, 9, 5)]
    responses = [torch.randint(10, 700, (n,), generator=g).tolist() for n in (6, 1, 4)]
    exp = build_experience(prompts, responses, pad_id=0)
    A = exp.num_actions
    policy = load_causal_lm(tiny_model_dir).eval()
    critic = load_scalar_model(build_tiny_model(tmp_path / "v", kind="scalar", seed=2)).eval()
    with torch.no_grad():
        logp, ent = action_logprobs_and_entropy(policy, exp.input_ids, exp.attention_mask, A, with_entropy=True)
        values = token_values(critic, exp.input_ids, exp.attention_mask, A)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            row = torch.tensor([p + r])
            logits = policy(input_ids=row).logits[0, len(p) - 1 : -1]
            want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            assert torch.allclose(logp[i, : len(r)], want, atol=1e-5)
            h = critic.model(input_ids=row).last_hidden_state
            want_v = critic.score(h[0, len(p) - 1 : -1]).squeeze(-1)
            assert torch.allclose(values[i, : len(r)], want_v, atol=1e-5)
    assert torch.isfinite(ent).all()


@pytest.mark.parametrize("hub_class", ["TokenizersBackend", "PreTrainedTokenizerFast"])
def test_a_generic_llama_tokenizer_loads_as_autotokenizer_would(tiny_model_dir, tmp_path, hub_class):
    """The direct load of a Llama directory's generic tokenizer gives AutoTokenizer's class, ids and chat prompt."""
    import json
    import shutil

    from transformers import AutoTokenizer

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": hub_class}))
    ours, auto = load_tokenizer(d), AutoTokenizer.from_pretrained(str(d))
    assert type(ours) is type(auto)
    chat = [{"role": "user", "content": "Describe a cat."}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == auto.apply_chat_template(chat, add_generation_prompt=True)
    assert ours("a cat sat").input_ids == auto("a cat sat").input_ids
    assert (ours.pad_token_id, ours.eos_token_id, ours.bos_token_id) == (auto.pad_token_id, auto.eos_token_id, auto.bos_token_id)
