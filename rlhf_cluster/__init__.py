"""rlhf_cluster: distributed RLHF on Ray actors (vLLM rollout, DeepSpeed trainers, frozen scorers).

Import submodules explicitly; this package imports nothing heavy on purpose.
"""

__version__ = "0.1.0"
