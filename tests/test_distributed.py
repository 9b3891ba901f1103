"""Several processes: real torchrun launches of 2 ranks on CPU (gloo), against one process.

2 ranks x P prompts must give the student of 1 rank x 2P prompts; a checkpoint written by 2 ranks must
resume on 1 and the other way round; bad input must fail on every rank before any weight loads; a rank
that dies must end the job, non-zero and with no final/.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from opd.checkpoint import latest_checkpoint
from opd.sinks import read_metrics


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def command(config: dict, tmp_path: Path, name: str, ranks: int, *extra: str) -> tuple[list[str], dict]:
    """`opd train` on `ranks` processes (torchrun, its rendezvous and gloo on 127.0.0.1 only), or plainly
    for one rank; with the environment to run it in."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    opd = ["-m", "opd", "train", str(path), *extra]
    launcher = [sys.executable] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--node-rank=0", "--master-addr=127.0.0.1",
        f"--master-port={free_port()}", f"--nproc-per-node={ranks}"]
    return [*launcher, *opd], {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


@contextmanager
def started(argv: list[str], env: dict):
    """The job in a process group of its own, which is killed whole on the way out, pass or fail."""
    job = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                           start_new_session=True)
    try:
        yield job
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        try:  # workers the launcher left behind, if any
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch(config: dict, tmp_path: Path, name: str, ranks: int, *extra: str) -> subprocess.CompletedProcess:
    argv, env = command(config, tmp_path, name, ranks, *extra)
    with started(argv, env) as job:
        stdout, stderr = job.communicate(timeout=600)
    return subprocess.CompletedProcess(argv, job.returncode, stdout, stderr)


def run_config(tiny_config, output_dir: Path, steps: int, micro: int, **run) -> dict:
    return {**tiny_config,
            "run": {**tiny_config["run"], "output_dir": str(output_dir), "max_steps": steps, **run},
            "batch": {"prompts_per_step": 4, "micro_batch_size": micro},
            "rollout": {"samples_per_prompt": 2, "max_new_tokens": 8},
            "optim": {"lr": 1e-2, "schedule": "constant", "eps": 1e-3}}


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "final" / "model.safetensors")


def assert_same_update(a: dict, b: dict, start: dict, fraction: float = 0.01) -> None:
    """Max |a - b| within `fraction` of the largest change either run made."""
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 1e-4
    difference = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert difference <= fraction * moved, (difference, moved)


@pytest.mark.parametrize("micro", [8, 2])
def test_two_ranks_equal_one_rank_with_the_whole_batch(tiny_config, tmp_path, micro):
    start = load_file(Path(tiny_config["student"]["path"]) / "model.safetensors")
    one = launch(run_config(tiny_config, tmp_path / "one", 3, micro), tmp_path, "one", 1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = launch(run_config(tiny_config, tmp_path / "two", 3, micro), tmp_path, "two", 2)
    assert two.returncode == 0, two.stderr[-2000:]
    assert_same_update(weights(tmp_path / "one"), weights(tmp_path / "two"), start)
    rows_one, rows_two = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("one", "two"))
    assert [row["step"] for row in rows_two] == [0, 1, 2, 3]  # one metrics file, written by rank 0 alone
    for key in ("logprob/teacher", "distill/reverse_kl", "generation/avg_length", "eval/distill/reverse_kl"):
        assert rows_two[-1][key] == pytest.approx(rows_one[-1][key], rel=1e-3, abs=1e-4), key
    assert rows_two[1]["compute/flops"] == pytest.approx(rows_one[1]["compute/flops"], rel=1e-6)


@pytest.mark.parametrize("shard", [False, True])
def test_a_checkpoint_of_two_ranks_resumes_on_one_and_back(tiny_config, tmp_path, shard):
    """Checkpoints hold whole states (a sharded student's gathered), so any world size resumes them."""
    start = load_file(Path(tiny_config["student"]["path"]) / "model.safetensors")
    straight = launch(run_config(tiny_config, tmp_path / "straight", 4, 4), tmp_path, "straight", 1)
    assert straight.returncode == 0, straight.stderr[-2000:]

    def config(output_dir, steps):
        raw = run_config(tiny_config, output_dir, steps, 4, save_every=1)
        raw["student"] = {**raw["student"], "shard": shard}
        return raw

    for first, then in ((2, 1), (1, 2)):
        output_dir = tmp_path / f"from-{first}-to-{then}"
        begun = launch(config(output_dir, 2), tmp_path, f"begin-{first}", first)
        assert begun.returncode == 0, begun.stderr[-2000:]
        resumed = launch(config(output_dir, 4), tmp_path, f"resume-{then}", then, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "resuming from" in resumed.stdout
        assert_same_update(weights(tmp_path / "straight"), weights(output_dir), start)
        assert [row["step"] for row in read_metrics(output_dir / "metrics.jsonl")] == [0, 1, 2, 3, 4]


def test_a_tied_student_is_not_sharded_and_says_so_before_weights_load(tiny_config, tmp_path):
    from conftest import make_tiny_model

    config = run_config(tiny_config, tmp_path / "run", 2, 4)
    config["student"] = {"path": str(make_tiny_model(tmp_path / "tied", seed=4, tied=True)), "shard": True}
    result = launch(config, tmp_path, "tied", 2)
    assert result.returncode != 0 and result.stderr.count("error: student.shard: ") == 2
    assert "ties its LM head" in result.stderr and not (tmp_path / "run").exists()


def test_prompts_that_do_not_split_evenly_fail_on_every_rank_before_weights_load(tiny_config, tmp_path):
    config = run_config(tiny_config, tmp_path / "run", 2, 4)
    config["batch"]["prompts_per_step"] = 3
    result = launch(config, tmp_path, "uneven", 2)
    assert result.returncode != 0
    assert result.stderr.count("error: batch.prompts_per_step=3 does not divide by the world size 2") == 2
    assert "Traceback" not in result.stderr.split("error:")[0] and not (tmp_path / "run").exists()


def test_a_rank_that_dies_ends_the_job_without_a_final_model(tiny_config, tmp_path):
    output_dir = tmp_path / "run"
    config = run_config(tiny_config, output_dir, 400, 4, save_every=1)
    config["data"]["eval"] = None
    with started(*command(config, tmp_path, "doomed", 2)) as job:
        deadline = time.time() + 120
        while latest_checkpoint(output_dir) is None and time.time() < deadline and job.poll() is None:
            time.sleep(0.2)
        assert latest_checkpoint(output_dir) is not None
        workers = subprocess.run(["pgrep", "-f", "-P", str(job.pid), "opd"], capture_output=True,
                                 text=True).stdout.split()
        assert len(workers) == 2
        os.kill(int(workers[-1]), signal.SIGKILL)
        killed_at = time.time()
        job.wait(timeout=180)
        assert job.returncode != 0 and time.time() - killed_at < 120
    assert not (output_dir / "final").exists()


@pytest.mark.parametrize("micro", [8, 2])
def test_a_student_sharded_with_fsdp2_on_two_ranks_equals_one_rank(tiny_config, tmp_path, micro):
    start = load_file(Path(tiny_config["student"]["path"]) / "model.safetensors")
    one = launch(run_config(tiny_config, tmp_path / "one", 3, micro), tmp_path, "one", 1)
    assert one.returncode == 0, one.stderr[-2000:]
    sharded = run_config(tiny_config, tmp_path / "sharded", 3, micro)
    sharded["student"] = {**sharded["student"], "shard": True}
    two = launch(sharded, tmp_path, "sharded", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_update(weights(tmp_path / "one"), weights(tmp_path / "sharded"), start)
    assert weights(tmp_path / "sharded").keys() == start.keys()  # final/ is a plain Hugging Face folder
