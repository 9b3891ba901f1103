"""Several processes: real torchrun launches of 2 ranks on CPU (gloo), against one process.

2 ranks x P prompts must give the student of 1 rank x 2P prompts; a checkpoint written by 2 ranks must
resume on 1 and the other way round; bad input must fail on every rank before any weight loads; a rank
that dies must end the job, non-zero and with no final/.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd.io.checkpoint import latest_checkpoint
from opd.io.sinks import read_metrics

from processes import command, launch, running

pytestmark = pytest.mark.e2e  # every test here runs opd in processes of its own


def run_config(tiny_config, output_dir: Path, steps: int, micro: int, **run) -> dict:
    return {
        **tiny_config,
        "run": {**tiny_config["run"], "output_dir": str(output_dir), "max_steps": steps, **run},
        "batch": {"prompts_per_step": 4, "micro_batch_size": micro},
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 8},
        "optim": {"lr": 1e-2, "schedule": "constant", "eps": 1e-3},
    }


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "final" / "model.safetensors")


def assert_same_update(a: dict, b: dict, start: dict, fraction: float = 0.01) -> None:
    """Max |a - b| within `fraction` of the largest change either run made."""
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    assert moved > 1e-4
    difference = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert difference <= fraction * moved, (difference, moved)


@pytest.fixture(scope="module")
def one_rank(tiny_models, tiny_data, tmp_path_factory):
    """final/ weights, metrics and student path of one-process runs (3 steps, 4 prompts a step), by
    (micro-batch, student variant, LoRA), each run once for the module."""
    from conftest import make_tiny_model, tiny_raw_config

    root, runs = tmp_path_factory.mktemp("one-rank"), {}
    students = {"untied": tiny_models["student"], "tied": None}

    def run(
        micro: int, student: str = "untied", lora: bool = False, forward_kl: bool = True
    ) -> tuple[dict, list, Path]:
        key = (micro, student, lora, forward_kl)
        if key not in runs:
            if students[student] is None:
                students[student] = make_tiny_model(root / "tied-model", seed=4, tied=True)
            base = tiny_raw_config(root / "unused", {**tiny_models, "student": students[student]}, tiny_data)
            output_dir = root / f"{micro}-{student}-{lora}-{forward_kl}"
            config = run_config(base, output_dir, 3, micro)
            if not forward_kl:  # what a sharded teacher resolves the default's forward-KL term to
                config["loss"] = {"forward_kl_coef": 0.0}
            if lora:
                config["student"]["lora"] = LORA
            result = launch(config, root, output_dir.name, 1)
            assert result.returncode == 0, result.stderr[-2000:]
            runs[key] = (weights(output_dir), read_metrics(output_dir / "metrics.jsonl"), students[student])
        return runs[key]

    return run


LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "lm_head"]}


@pytest.mark.parametrize(
    "micro, shard_student, shard_teacher, student",
    [
        (2, False, False, "untied"),  # replicated, micro-batched (one rank's runs cover a whole micro-batch)
        (2, False, True, "untied"),  # the teacher sharded
        (8, True, True, "untied"),
        (2, True, False, "untied"),  # the student sharded
        (2, True, False, "tied"),  # a student whose LM head is its input embeddings (Qwen3-1.7B's layout)
    ],
)
def test_two_ranks_equal_one_rank_with_the_whole_batch(
    one_rank, tiny_config, tmp_path, micro, shard_student, shard_teacher, student
):
    expected, rows_one, student_path = one_rank(micro, student, forward_kl=not shard_teacher)
    config = run_config(tiny_config, tmp_path / "two", 3, micro)
    config["student"]["path"] = str(student_path)
    config["student"]["shard"], config["teacher"]["shard"] = shard_student, shard_teacher
    start = load_file(Path(config["student"]["path"]) / "model.safetensors")
    two = launch(config, tmp_path, "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_update(expected, weights(tmp_path / "two"), start)
    assert weights(tmp_path / "two").keys() == start.keys()  # final/ is a plain Hugging Face folder
    rows_two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [row["step"] for row in rows_two] == [0, 1, 2, 3]  # one metrics file, written by rank 0 alone
    for key in ("logprob/teacher", "distill/reverse_kl", "generation/avg_length", "eval/distill/reverse_kl"):
        assert rows_two[-1][key] == pytest.approx(rows_one[-1][key], rel=1e-3, abs=1e-4), key
    assert rows_two[1]["compute/flops"] == pytest.approx(rows_one[1]["compute/flops"], rel=1e-6)


@pytest.mark.parametrize("shard", [False, True])
def test_a_lora_student_on_two_ranks_equals_one_rank(one_rank, tiny_config, tmp_path, shard):
    """Adapters only train, replicated or under FSDP2; final/ is the merged model with adapter/ beside it."""
    expected, _, _ = one_rank(4, lora=True)
    config = run_config(tiny_config, tmp_path / "two", 3, 4)
    config["student"].update(shard=shard, lora=LORA)
    two = launch(config, tmp_path, "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    start = load_file(Path(tiny_config["student"]["path"]) / "model.safetensors")
    assert_same_update(expected, weights(tmp_path / "two"), start)
    assert (tmp_path / "two" / "final" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.fixture(scope="module")
def one_rank_runs() -> dict:
    """One-rank runs shared by parameters that differ only in what two ranks do (student.shard)."""
    return {}


@pytest.mark.parametrize(
    "lam, shard",
    [
        ("0.5, the data's answers", None),
        ("auto, measured far without a held-out set", None),
        ("auto, measured far without a held-out set", "student"),
        ("0.5, the teacher's samples (sft)", "teacher"),
    ],
)
def test_a_mixture_with_the_student_prompts_on_one_rank_equals_one_rank(
    tiny_config, tmp_path, one_rank_runs, lam, shard
):
    """GKD's lambda 0.5 with 2 prompts a step on 2 ranks: rank 0's prompt is the student's to sample, rank
    1's takes the data's answer. Every collective must pair across ranks, although one rank has no
    student rows (the ranks once disagreed on whether the batch carried the sampler's entropy, and the
    run deadlocked). Bounded in time, and the weights and metrics of one rank with both prompts.
    With lambda auto (a threshold that makes the tiny pair far), both ranks measure the first training
    prompts, decide alike, and the teacher writes the other rows: lambda 0 at step 1, 0.5 at step 2.
    With the student sharded, rank 1 joins the gathers of rank 0's sampling at step 2 (no rank samples
    the student at step 1); with the teacher sharded and writing rows, rank 0 joins rank 1's."""
    rollout, loss = {"student_fraction": 0.5, "off_policy_source": "dataset"}, {}
    data = tiny_config["data"]
    if lam.startswith("auto"):
        rollout, data = {"far_reverse_kl": 1e-6}, {**data, "eval": None}
    if "teacher's samples" in lam:  # a sharded teacher gives no whole distribution: its rows train by NLL
        rollout, loss = {"student_fraction": 0.5}, {"off_policy_kind": "sft", "forward_kl_coef": 0.0}
    config = {
        **tiny_config,
        "run": {**tiny_config["run"], "max_steps": 2},
        "data": data,
        "rollout": {**tiny_config["rollout"], **rollout},
        "loss": {**tiny_config.get("loss", {}), **loss},
        "optim": {"lr": 1e-2, "schedule": "constant", "eps": 1e-3},
    }
    start = load_file(Path(config["student"]["path"]) / "model.safetensors")
    if lam not in one_rank_runs:
        one_rank_runs[lam] = run_ranks(config, tmp_path / "1-rank", 1)
    runs = {
        1: one_rank_runs[lam][1],
        2: run_ranks(
            {**config, **({shard: {**config[shard], "shard": True}} if shard else {})}, tmp_path / "2-ranks", 2
        )[1],
    }
    assert_same_update(one_rank_runs[lam][0], weights(tmp_path / "2-ranks"), start)
    if lam.startswith("auto"):
        assert [row["from_teacher/rows_fraction"] for row in runs[2]] == [1.0, 0.5]
    for one, two in zip(runs[1], runs[2]):
        for key in ("entropy/student", "distill/reverse_kl", "generation/avg_length"):
            if key in one:
                assert two[key] == pytest.approx(one[key], rel=1e-3, abs=1e-5), key


def run_ranks(config: dict, output_dir: Path, ranks: int) -> tuple[dict, list[dict]]:
    """final/ weights and metrics of `config` run on `ranks` processes into output_dir (bounded in time)."""
    raw = {**config, "run": {**config["run"], "output_dir": str(output_dir)}}
    result = launch(raw, output_dir.parent, output_dir.name, ranks, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return weights(output_dir), read_metrics(output_dir / "metrics.jsonl")


def killed_at_step(config: dict, tmp_path: Path, name: str, ranks: int, step: int) -> None:
    """Run until every process kills itself with SIGKILL on reaching `step`."""
    argv, env = command(
        config, tmp_path, name, ranks, program=[str(Path(__file__).parent.parent / "sigkill_at_step.py")]
    )
    with running(argv, {**env, "OPD_SIGKILL_AT_STEP": str(step)}) as job:
        job.wait(timeout=300)
    assert job.returncode != 0 and not (Path(config["run"]["output_dir"]) / "final").exists()


@pytest.mark.parametrize("shard", [True])  # a replicated student's kill on 2 ranks: the max_staleness test below
def test_a_run_killed_on_two_ranks_resumes_on_one_and_back(one_rank, tiny_config, tmp_path, shard):
    """DCP checkpoints reshard: killed by SIGKILL after a checkpoint on N ranks, resumed on M, the weights
    of an uninterrupted run."""
    expected, _, _ = one_rank(4)
    start = load_file(Path(tiny_config["student"]["path"]) / "model.safetensors")

    def config(output_dir):
        raw = run_config(tiny_config, output_dir, 3, 4, save_every=1)
        raw["student"]["shard"] = shard
        return raw

    for first, then in ((2, 1), (1, 2)):
        output_dir = tmp_path / f"from-{first}-to-{then}"
        killed_at_step(config(output_dir), tmp_path, f"begin-{first}", first, step=3)
        checkpoint = latest_checkpoint(output_dir)
        assert checkpoint.name == "step-2"
        resumed = launch(config(output_dir), tmp_path, f"resume-{then}", then, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert f"resuming from {checkpoint} (step 2, written by {first} ranks)" in resumed.stdout
        assert_same_update(expected, weights(output_dir), start)
        assert [row["step"] for row in read_metrics(output_dir / "metrics.jsonl")][-1] == 3


def test_two_ranks_with_batches_sampled_ahead_equal_one_rank_across_a_kill(tiny_config, tmp_path):
    """rollout.max_staleness 1 on 2 ranks, killed while sampling step 3's batch (step 2's batch in flight,
    kept by step 1's checkpoint with each rank's rows) and resumed on 2: one rank's uninterrupted run."""
    start = load_file(Path(tiny_config["student"]["path"]) / "model.safetensors")

    def config(output_dir):
        raw = run_config(tiny_config, output_dir, 4, 4, save_every=1)
        raw["rollout"] = {**raw["rollout"], "max_staleness": 1}
        return raw

    one = launch(config(tmp_path / "one"), tmp_path, "one", 1)
    assert one.returncode == 0, one.stderr[-2000:]
    output_dir = tmp_path / "two"
    killed_at_step(config(output_dir), tmp_path, "two-begin", 2, step=3)
    assert latest_checkpoint(output_dir).name == "step-1"
    resumed = launch(config(output_dir), tmp_path, "two-resume", 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_update(weights(tmp_path / "one"), weights(output_dir), start)
    rows = read_metrics(output_dir / "metrics.jsonl")[1:]  # after the evaluation at step 0
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert [row["staleness/max"] for row in rows] == [0, 1, 1, 1]
    assert rows[-1]["eval/distill/reverse_kl"] == pytest.approx(
        read_metrics(tmp_path / "one" / "metrics.jsonl")[-1]["eval/distill/reverse_kl"], rel=1e-3
    )


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
    with running(*command(config, tmp_path, "doomed", 2)) as job:
        deadline = time.time() + 120
        while latest_checkpoint(output_dir) is None and time.time() < deadline and job.poll() is None:
            time.sleep(0.2)
        assert latest_checkpoint(output_dir) is not None
        workers = subprocess.run(
            ["pgrep", "-f", "-P", str(job.pid), "opd"], capture_output=True, text=True
        ).stdout.split()
        assert len(workers) == 2
        os.kill(int(workers[-1]), signal.SIGKILL)
        killed_at = time.time()
        job.wait(timeout=180)
        assert job.returncode != 0 and time.time() - killed_at < 120
    assert not (output_dir / "final").exists()
