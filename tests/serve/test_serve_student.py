"""`opd serve-student`'s command line for vLLM's server: what a rollout server needs, by device."""

from __future__ import annotations

import json

from opd.serve.student import CPU_MEMORY_SHARE, server_command


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_without_a_gpu_the_server_takes_gloo_eager_mode_and_a_share_of_the_hosts_memory():
    argv, env = server_command("m", "127.0.0.1", 8100, api_key="secret", gpu=False)
    assert json.loads(flag(argv, "--weight-transfer-config")) == {"backend": "gloo"}
    assert flag(argv, "--logprobs-mode") == "processed_logprobs"
    assert {"--enable-scale-out", "--enable-prefix-caching", "--enforce-eager"} <= set(argv)
    # vLLM's default (0.9) would reserve nearly all the host's memory for its KV cache.
    assert flag(argv, "--gpu-memory-utilization") == str(CPU_MEMORY_SHARE)
    assert (flag(argv, "--host"), flag(argv, "--port")) == ("127.0.0.1", "8100")
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert env["VLLM_API_KEY"] == "secret" and "secret" not in argv  # never on the command line `ps` shows


def test_with_a_gpu_the_server_takes_nccl_and_vllms_own_defaults():
    argv, _ = server_command("m", "0.0.0.0", 8101, gpu=True)
    assert json.loads(flag(argv, "--weight-transfer-config")) == {"backend": "nccl"}
    assert "--enforce-eager" not in argv and "--gpu-memory-utilization" not in argv
    argv, _ = server_command("m", "127.0.0.1", 8101, gpu=True, gpu_memory_utilization=0.5, weight_transfer="gloo")
    assert flag(argv, "--gpu-memory-utilization") == "0.5"
    assert json.loads(flag(argv, "--weight-transfer-config")) == {"backend": "gloo"}


def test_arguments_for_vllm_pass_through_and_a_users_eager_choice_stands():
    argv, _ = server_command("m", "127.0.0.1", 8100, gpu=False, extra=["--no-enforce-eager", "--max-num-seqs", "8"])
    assert "--enforce-eager" not in argv
    assert argv[-3:] == ["--no-enforce-eager", "--max-num-seqs", "8"]
