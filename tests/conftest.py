"""Shared fixtures. Tiers: unit/ (pure, seconds), workers/ (real workers in one process), cluster/ (a real
local Ray per module, real `ray start --head` clusters), e2e/ (the CLI exactly as a user types it)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # shared helpers (reward_model_fixture) for every tier

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny causal LM + tokenizer directory (built once per test session, ~5 s)."""
    from rlhf_cluster.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))
