"""The student's rollout engines by `rollout.engine`, as `SERVER_APIS` lists the teachers' servers.

An engine is one module that defines a `RolloutEngine` (opd.rollout.sampler): its check before any
weight loads, its Sampler, and its lines of the memory plan. Adding one is that module, a line here,
and its name (and settings, if it has any) in the config's `rollout` section.
"""

from __future__ import annotations

from opd.rollout import vllm_engine, vllm_server_engine
from opd.rollout.sampler import OPD_ENGINE, RolloutEngine

ENGINES: dict[str, RolloutEngine] = {
    "opd": OPD_ENGINE,  # opd's own batched sampler (opd.rollout.sampler.ModelSampler)
    "vllm": vllm_engine.ENGINE,  # a vLLM engine in the training process (opd.rollout.vllm_engine)
    "vllm_server": vllm_server_engine.ENGINE,  # vllm serve processes of their own (opd.rollout.vllm_server_engine)
}
