"""vLLM plugin (entry point ``vllm.general_plugins: rlhf_cluster``): adds the ``gloo`` weight-transfer backend.

vLLM runs general plugins in every process it starts, so engines in worker processes
(tensor parallelism) know the backend too. Registration is by module path: nothing is
imported until an engine asks for ``gloo``.
"""

_MODULE = "rlhf_cluster.workers.weight_transfer"


def register() -> None:
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    if "gloo" not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine("gloo", _MODULE, "GlooWeightTransferEngine")
    if "gloo" not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine("gloo", _MODULE, "GlooTrainerWeightTransferEngine")
