"""`rollout.student_fraction: auto`: step 0 measures how far the student's samples are from the teacher
and starts a far student from the teacher's samples (GKD's mixture, lambda 0 -> 0.5 over half the run),
a near one on-policy; a resumed run repeats the decision it recorded."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch
import yaml

from opd.config.files import validate
from opd.config.resolve import RESOLVED_FILE, far_start, resolve, why_not_far
from opd.errors import ConfigError
from opd.io.sinks import read_metrics
from opd.train.setup import prepare
from opd.train.start import choose_start, start_gap
from opd.train.trainer import train

from weights import assert_weights_close, final_weights


def without_eval(tiny_config) -> dict:
    return {**tiny_config, "data": {**tiny_config["data"], "eval": None}}


def with_threshold(config, threshold: float):
    return config.model_copy(update={"rollout": config.rollout.model_copy(update={"far_reverse_kl": threshold})})


def reference_gap(session, count: int) -> float:
    """The mean over the student's sampled tokens of log p_student - log p_teacher, each model run on
    each prompt + completion alone (no padding, no opd scoring code): the samples are opd's, drawn as
    the probe draws them (the evaluation's seed, one a prompt)."""
    batch = session.student_sampler.sample(
        session.train_prompts.batch(list(range(count))), 1, session.config.run.seed + 1
    )
    student, teacher = session.student.model, session.teacher.loaded.model
    vocab = session.student.vocab_size
    total, tokens = 0.0, 0
    for row in range(len(batch)):
        prompt = batch.prompt_ids[row][batch.prompt_mask[row].bool()]
        completion = batch.completion_ids[row][batch.completion_mask[row].bool()]
        ids = torch.cat([prompt, completion])[None]
        with torch.no_grad():
            for model, sign in ((student, 1.0), (teacher, -1.0)):
                logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1, :vocab].double()
                total += sign * float(logits.log_softmax(-1).gather(-1, completion[:, None]).sum())
        tokens += len(completion)
    return total / tokens


def test_auto_is_the_default_and_is_on_policy_until_decided(tiny_config):
    config = validate(tiny_config)
    assert config.rollout.student_fraction == "auto"
    assert not config.mixed and config.student_fraction_at(1) == 1.0
    with pytest.raises(ConfigError, match="rollout.student_fraction_start"):
        validate({**tiny_config, "rollout": {**tiny_config["rollout"], "student_fraction_ramp_steps": 5}})


@pytest.mark.parametrize("max_steps", [1, 7, 40])
def test_the_far_start_ramps_lambda_from_0_to_half_over_half_the_run(tiny_config, max_steps):
    request = validate({**tiny_config, "run": {**tiny_config["run"], "max_steps": max_steps}})
    far = far_start(request)
    ramp = max(1, max_steps // 2)
    for step in range(1, max_steps + 1):
        assert far.student_fraction_at(step) == pytest.approx(0.5 * min(1.0, (step - 1) / ramp))
    assert far.mixed and far.rollout.off_policy_source == "teacher"
    assert far.loss.forward_kl_coef == 0.0  # left null: the teacher's rows give the forward KL's pull
    asked = validate({**tiny_config, "loss": {"forward_kl_coef": 0.5}})
    assert far_start(asked).loss.forward_kl_coef == 0.5  # a weight the user set stays


def test_a_run_that_cannot_mix_is_on_policy_without_measuring(tiny_config):
    sglang = {**tiny_config, "teacher": {"url": "http://127.0.0.1:9", "api": "sglang"}}  # it scores only
    reason = why_not_far(validate(sglang), {})
    assert reason is not None and "\n" not in reason and "teacher" in reason
    assert resolve(validate(sglang)).rollout.student_fraction == 1.0
    assert resolve(validate(tiny_config)).rollout.student_fraction == "auto"  # a local teacher: measured
    # opd's and vLLM's servers sample: measured too, far by NLL, or with the head here by the forward KL
    for api, head, kind in (("opd", None, "sft"), ("vllm", None, "sft"), ("opd", "/x", "forward_kl")):
        served = validate({**tiny_config, "teacher": {"url": "http://127.0.0.1:9", "api": api, "lm_head": head}})
        assert why_not_far(served, {}) is None and resolve(served).rollout.student_fraction == "auto"
        assert resolve(far_start(served)).loss.off_policy_kind == kind
    # NLL where the forward KL can't run and the key is left null; a forward_kl asked of a server
    # without its head can't start far, nor can one asked with truncated sampling (top_p, top_k).
    asked = {**tiny_config, "teacher": {"url": "http://127.0.0.1:9"}, "loss": {"off_policy_kind": "forward_kl"}}
    assert "lm_head" in why_not_far(validate(asked), {})
    for truncated in ({"top_p": 0.9}, {"top_k": 5}):
        config = {**tiny_config, "rollout": {**tiny_config["rollout"], **truncated}}
        assert why_not_far(validate(config), {}) is None
        assert resolve(far_start(validate(config))).loss.off_policy_kind == "sft"
        forward_kl = validate({**config, "loss": {"off_policy_kind": "forward_kl"}})
        assert "top_p=1" in why_not_far(forward_kl, {})
    # Resumed: the recorded value where the key is null (a run from before null recorded forward_kl,
    # which a server without its head keeps where it doesn't mix); one the user sets is theirs.
    served = validate({**tiny_config, "teacher": {"url": "http://127.0.0.1:9"}})
    recorded = resolve(far_start(served)).model_dump()
    assert recorded["loss"]["off_policy_kind"] == "sft"
    head = {**tiny_config, "teacher": {"url": "http://127.0.0.1:9", "lm_head": "/x"}}
    assert resolve(validate(head), None, recorded).loss.off_policy_kind == "sft"
    chosen = {**head, "loss": {"off_policy_kind": "forward_kl"}}
    assert resolve(validate(chosen), None, recorded).loss.off_policy_kind == "forward_kl"
    old_run = {"loss": {"off_policy_kind": "forward_kl"}, "rollout": {"student_fraction": 1.0}}
    assert resolve(served, None, old_run).loss.off_policy_kind == "forward_kl"
    reward_alone = {**tiny_config, "loss": {"kl_coef": 0.0}, "reward": {"verifier": "gsm8k"}}
    assert resolve(validate(reward_alone)).rollout.student_fraction == 1.0  # pure RL is left as asked


def test_the_probe_measures_the_reverse_kl_of_the_students_samples(tiny_config):
    """Without a held-out set, the gap is measured on the first training prompts: it equals a brute-force
    reference on the same samples, and the decision flips where the threshold crosses it."""
    session = prepare(validate(without_eval(tiny_config)), resume=False, log=lambda *_: None)
    count = session.config.batch.prompts_per_step
    gap, where = start_gap(session, {})
    assert where == f"the first {count} training prompts"
    assert gap == pytest.approx(reference_gap(session, count), rel=1e-4)
    assert start_gap(session, {"eval/distill/seq_reverse_kl": 3.5}) == (3.5, "held-out prompts")

    resolved = session.output_dir / RESOLVED_FILE
    near = choose_start(replace(session, config=with_threshold(session.config, gap * 1.01)), {}, log=lambda *_: None)
    assert near.config.rollout.student_fraction == 1.0 and not near.config.mixed
    assert near.rollouts is session.rollouts and near.far_config is None
    assert yaml.safe_load(resolved.read_text())["rollout"]["student_fraction"] == 1.0

    far = choose_start(replace(session, config=with_threshold(session.config, gap * 0.99)), {}, log=lambda *_: None)
    assert far.config == session.far_config and far.rollouts is session.far_rollouts
    assert far.config.student_fraction_at(1) == 0.0 and far.config.rollout.student_fraction == 0.5
    assert validate(yaml.safe_load(resolved.read_text())) == far.config


def test_a_far_start_is_recorded_and_a_resumed_run_repeats_it_exactly(tiny_config, tmp_path):
    """A tiny threshold makes the tiny pair far: step 1 is the teacher's samples alone, the decision is
    in resolved.yaml, and a run stopped after step 1 and resumed (without measuring again) ends with
    the weights of one that ran through."""
    raw = {
        **tiny_config,
        "run": {**tiny_config["run"], "max_steps": 4, "save_every": 1},
        "rollout": {**tiny_config["rollout"], "far_reverse_kl": 1e-6},
    }
    logs: list[str] = []
    through = train(validate(raw), log=logs.append).output_dir
    assert sum("starts far from the teacher" in line for line in logs) == 1
    rows = {row["step"]: row for row in read_metrics(through / "metrics.jsonl")}
    assert rows[1]["from_teacher/rows_fraction"] == 1.0  # lambda(1) = 0
    assert rows[4]["from_teacher/rows_fraction"] == 0.5  # lambda = 0.5 from step 3 (ramp of 2)
    recorded = yaml.safe_load((through / RESOLVED_FILE).read_text())
    assert recorded["rollout"]["student_fraction"] == 0.5 and recorded["rollout"]["student_fraction_ramp_steps"] == 2
    assert recorded["loss"]["forward_kl_coef"] == 0.0

    stopped = {**raw, "run": {**raw["run"], "output_dir": str(tmp_path / "stopped")}}
    train(validate(stopped), log=lambda *_: None, time_limit_s=0)  # stops after step 1
    resumed_logs: list[str] = []
    # A threshold no student reaches: a resumed run that measured again would turn on-policy.
    changed = {**stopped, "rollout": {**stopped["rollout"], "far_reverse_kl": 1e9}}
    train(validate(changed), resume=True, log=resumed_logs.append)
    assert not any("student_fraction auto" in line for line in resumed_logs)
    assert_weights_close(final_weights(through), final_weights(tmp_path / "stopped"), atol=0)


def test_a_far_start_from_the_datas_answers_resumes_and_a_restart_measures_again(tiny_config, tmp_path):
    """off_policy_source dataset, as the user set it, writes a far start's other rows and survives a
    resume; --resume-or-start with no checkpoint starts at step 0 and measures again (here near)."""
    raw = {
        **tiny_config,
        "run": {**tiny_config["run"], "max_steps": 2, "save_every": 1},
        "rollout": {**tiny_config["rollout"], "far_reverse_kl": 1e-6, "off_policy_source": "dataset"},
        "loss": {"off_policy_kind": "sft"},
    }
    train(validate(raw), log=lambda *_: None, time_limit_s=0)  # stops after step 1
    output_dir = tmp_path / "run"
    assert read_metrics(output_dir / "metrics.jsonl")[-1]["from_dataset/rows_fraction"] == 1.0
    train(validate(raw), resume=True, log=lambda *_: None)
    recorded = yaml.safe_load((output_dir / RESOLVED_FILE).read_text())
    assert recorded["rollout"]["off_policy_source"] == "dataset" and recorded["rollout"]["student_fraction"] == 0.5

    for written in ("checkpoints", "final"):  # as if killed before its first checkpoint
        shutil.rmtree(output_dir / written)
    logs: list[str] = []
    near = {**raw, "rollout": {**raw["rollout"], "far_reverse_kl": 1e9}}
    train(validate(near), resume="auto", log=logs.append)
    assert any("student_fraction auto: on-policy (reverse KL" in line for line in logs)
    assert yaml.safe_load((output_dir / RESOLVED_FILE).read_text())["rollout"]["student_fraction"] == 1.0


def test_a_data_set_without_answers_keeps_a_dataset_far_start_off(tiny_config, tmp_path):
    rows = tmp_path / "questions.jsonl"
    rows.write_text('{"question": "What is 2 + 2?"}\n' * 4)
    raw = {
        **tiny_config,
        "data": {**tiny_config["data"], "train": str(rows)},
        "rollout": {**tiny_config["rollout"], "off_policy_source": "dataset"},
        "loss": {"off_policy_kind": "sft"},
    }
    logs: list[str] = []
    session = prepare(validate(raw), resume=False, log=logs.append)
    assert session.config.rollout.student_fraction == 1.0 and session.far_config is None
    assert any(f"needs an 'answer' on every row of {rows}" in line for line in logs)
