"""GKD's lambda: a share of each step's prompts sampled by the student, the rest by the teacher or taken
from the data; each row trained by its source's loss, in one step normalized by all of its tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd.config.files import validate
from opd.errors import ConfigError
from opd.io.sinks import read_metrics
from opd.objectives.kinds import BySource, NegativeLogLikelihood, PolicyGradient
from opd.ops.batch import DATASET, STUDENT, TEACHER, TokenChunk
from opd.ops.logprobs import token_logprobs
from opd.train.setup import prepare
from opd.train.step import train_step
from opd.train.trainer import train

from weights import assert_weights_close, one_step


def mixed(tiny_config, **rollout) -> dict:
    return {**tiny_config, "rollout": {**tiny_config["rollout"], "student_fraction": 0.5, **rollout}}


def test_lambda_of_one_is_exactly_todays_run(tiny_config, tmp_path):
    """The default, lambda auto, measures the tiny pair near on its first training prompts (one_step has
    no held-out set), which must leave the run exactly the on-policy one: the measuring draws from its
    own keyed streams, not the run's."""
    base = {**tiny_config, "optim": {"lr": 1e-2}}
    today = one_step(base, tmp_path, "default")
    explicit = one_step(
        base,
        tmp_path,
        "lambda-1",
        rollout={"student_fraction": 1.0, "student_fraction_start": 1.0, "student_fraction_ramp_steps": 3},
    )
    assert_weights_close(today, explicit, atol=0)


def test_the_lambda_schedule_ramps_linearly_then_holds(tiny_config):
    config = validate(
        mixed(tiny_config, student_fraction=1.0, student_fraction_start=0.2, student_fraction_ramp_steps=4)
    )
    assert [config.student_fraction_at(step) for step in (1, 2, 3, 5, 9)] == pytest.approx([0.2, 0.4, 0.6, 1.0, 1.0])
    assert validate(mixed(tiny_config)).student_fraction_at(7) == 0.5
    with pytest.raises(ConfigError, match="a mixture needs rollout.source=student"):
        validate({**mixed(tiny_config, source="dataset"), "loss": {"kind": "sft"}})


@pytest.mark.parametrize("off_source,off_kind", [("teacher", "forward_kl"), ("dataset", "sft")])
def test_a_mixed_step_has_rows_of_both_sources_and_metrics_split_by_source(tiny_config, off_source, off_kind):
    raw = mixed(tiny_config, off_policy_source=off_source)
    raw["loss"] = {"off_policy_kind": off_kind}
    raw["batch"] = {"prompts_per_step": 4, "micro_batch_size": 8}
    raw["data"] = {**raw["data"], "eval": None}
    config = validate(raw)
    session = prepare(config, resume=False, log=lambda *_: None)
    prompts = session.train_prompts.batch([0, 1, 2, 3])
    batch = session.rollouts.sample(prompts, 2, 0, step=1)
    off_id = {"teacher": TEACHER, "dataset": DATASET}[off_source]
    assert batch.row_sources().tolist() == [STUDENT] * 4 + [off_id] * 4  # 2 prompts each, their samples together
    assert batch.row_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    metrics, _ = train_step(session, step=2)
    assert metrics[f"from_{off_source}/rows_fraction"] == 0.5
    assert f"from_{off_source}/logprob/student" in metrics and "distill/reverse_kl" in metrics
    assert (
        f"from_{off_source}/distill/reverse_kl" not in metrics and f"from_{off_source}/entropy/student" not in metrics
    )
    assert f"from_{off_source}/distill/seq_reverse_kl" not in metrics
    assert 0 <= metrics["ratio/far_fraction"] <= 1 and metrics["ratio/max_abs_log"] < 1e-4  # student rows only


def test_each_row_is_trained_by_the_loss_of_its_source():
    """BySource gives the on-policy objective's values on student tokens and the off-policy one's on the
    others, with gradients to each."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, generator=generator, requires_grad=True)
    chunk = TokenChunk(
        completion_ids=torch.tensor([1, 2, 3, 4, 5, 6]),
        sampler_logprobs=-torch.rand(6, generator=generator),
        teacher_logprobs=None,
        teacher_hidden=None,
        teacher_topk_ids=None,
        teacher_topk_logprobs=None,
        advantages=torch.randn(6, generator=generator),
        source=torch.tensor([0, 1, 0, 2, 1, 0]),
    )
    on, off = PolicyGradient(1.0, 0, 1.0, None, 1.0, 0.0), NegativeLogLikelihood()
    values, logprobs = BySource(on, off).per_token(logits, chunk, None)
    student = chunk.source == STUDENT
    expected = torch.zeros(6)
    expected[student] = on.per_token(logits[student], chunk.subset(student), None)[0]
    expected[~student] = off.per_token(logits[~student], chunk.subset(~student), None)[0]
    torch.testing.assert_close(values, expected)
    torch.testing.assert_close(logprobs, token_logprobs(logits, chunk.tokens).detach())
    values.sum().backward()
    assert (logits.grad.abs().sum(-1) > 0).all()


def test_micro_batching_does_not_change_a_mixed_update(tiny_config, tmp_path):
    base = mixed(tiny_config)
    base["batch"] = {"prompts_per_step": 4, "micro_batch_size": 8}
    base["optim"] = {"lr": 1e-2, "max_grad_norm": None, "eps": 1e-3}
    whole = one_step(base, tmp_path, "whole")
    split = one_step(base, tmp_path, "split", batch={"micro_batch_size": 3})
    start = load_file(Path(tiny_config["student"]["path"]) / "model.safetensors")
    assert max(float((whole[k] - start[k]).abs().max()) for k in whole) > 1e-4
    assert_weights_close(whole, split, atol=1e-6)


def test_a_ramped_mixture_trains_end_to_end(tiny_config):
    raw = mixed(tiny_config, student_fraction=1.0, student_fraction_start=0.0, student_fraction_ramp_steps=2)
    raw["run"] = {**raw["run"], "max_steps": 3}
    result = train(validate(raw), log=lambda *_: None)
    rows = [row for row in read_metrics(result.output_dir / "metrics.jsonl") if "loss" in row]
    assert [row.get("from_teacher/rows_fraction", 0.0) for row in rows] == [1.0, 0.5, 0.0]
    assert "entropy/student" not in rows[0] and "entropy/student" in rows[2]  # step 1: no student rows yet


class KeyedSampler:
    """Records which keys it was asked to sample; returns a one-token completion per row."""

    gives_entropy = False

    def __init__(self, source):
        self.source, self.keys = source, []

    def sample(self, prompts, samples_per_prompt, seed):
        from conftest import make_batch

        self.keys += prompts.keys
        rows = len(prompts) * samples_per_prompt
        return make_batch(
            torch.ones(rows, 2, dtype=torch.long),
            torch.ones(rows, 2, dtype=torch.long),
            torch.ones(rows, 1, dtype=torch.long),
            torch.ones(rows, 1, dtype=torch.long),
        ).replace(source=torch.full((rows,), self.source))


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_the_student_share_is_counted_over_the_whole_step_whatever_the_world_size(fraction):
    """With 4 prompts a step, lambda = 0.75 is 3 student prompts on 1 rank and on 2 ranks alike (rounding
    each rank's share would give 4), and the student takes the same prompts (the step's first keys)."""
    from opd.rollout.mixture import RolloutMix

    from conftest import prompt_batch

    def student_keys(shares):
        student, teacher = KeyedSampler(STUDENT), KeyedSampler(TEACHER)
        mix = RolloutMix(student, teacher, lambda step: fraction)
        for keys in shares:
            batch = prompt_batch([[1]] * len(keys))
            batch.keys = keys
            mix.sample(batch, 2, 0, step=1, step_keys=range(0, 4))
        return sorted(student.keys)

    alone = student_keys([[0, 1, 2, 3]])
    assert alone == list(range(int(fraction * 4 + 0.5)))
    assert student_keys([[0, 2], [1, 3]]) == alone


def test_dataset_rows_keep_the_student_rows_entropy_and_the_guard_working(tiny_config):
    raw = mixed(tiny_config, off_policy_source="dataset")
    raw["loss"] = {"off_policy_kind": "sft"}
    raw["batch"] = {"prompts_per_step": 4, "micro_batch_size": 8}
    raw["data"] = {**raw["data"], "eval": None}
    config = validate(raw)
    session = prepare(config, resume=False, log=lambda *_: None)
    metrics, _ = train_step(session, step=1)
    assert metrics["entropy/student"] > 0 and session.guard.start_entropy == metrics["entropy/student"]
