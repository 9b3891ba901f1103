"""Task rewards beside distillation (`reward:`): group-normalized advantages against a brute-force
reference, either coefficient at 0 against the pure run bit for bit, the reward in the metrics, and a
verifier that can't be imported, raises or returns no number as one line naming it."""

from __future__ import annotations

import json
import math
import re
import statistics
import sys

import pytest
import torch

from opd.config.files import validate
from opd.data.rows import Example
from opd.errors import ConfigError, DataError
from opd.io.sinks import read_metrics
from opd.objectives.losses import group_advantages
from opd.rewards.verifiers import RewardFailed, RewardScorer
from opd.train.metrics import combine, rollout_metrics
from opd.train.setup import prepare
from opd.train.trainer import train

from conftest import run_cli
from weights import final_weights


def brute_force_group_advantages(rewards: list[float], groups: list[int], scale_by_std: bool) -> list[float]:
    out = []
    for reward, group in zip(rewards, groups):
        mates = [r for r, g in zip(rewards, groups) if g == group and not math.isnan(r)]
        if math.isnan(reward) or len(mates) < 2:
            out.append(0.0)
            continue
        centered = reward - statistics.fmean(mates)
        out.append(centered / (statistics.stdev(mates) + 1e-4) if scale_by_std else centered)
    return out


@pytest.mark.parametrize("scale_by_std", [False, True])
def test_group_advantages_equal_a_brute_force_reference(scale_by_std):
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        rows = int(torch.randint(1, 13, (), generator=generator))
        rewards = torch.randint(0, 3, (rows,), generator=generator).float() + torch.rand(rows, generator=generator)
        rewards[torch.rand(rows, generator=generator) < 0.2] = math.nan  # rows of another source: no reward
        groups = torch.randint(0, 4, (rows,), generator=generator) * 7  # ids need not be 0..G-1 nor sorted
        expected = brute_force_group_advantages(rewards.tolist(), groups.tolist(), scale_by_std)
        torch.testing.assert_close(
            group_advantages(rewards, groups, scale_by_std), torch.tensor(expected), rtol=1e-5, atol=1e-6
        )
    same = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 1]), scale_by_std=True)
    assert torch.equal(same, torch.zeros(4))  # all samples of a prompt alike: nothing to learn from it


def test_the_reward_metrics_combine_over_parts_as_over_the_whole(make_reward_batch):
    whole = make_reward_batch([1.0, 0.0, 0.5, 2.0, 0.0])
    parts = [whole.select(torch.tensor(rows)) for rows in ([0, 1], [2, 3, 4])]
    combined = combine([(rollout_metrics(part), part.num_tokens, len(part)) for part in parts])
    alone = rollout_metrics(whole)
    assert combined["reward/mean"] == pytest.approx(alone["reward/mean"]) == pytest.approx(0.7)
    assert (
        combined["reward/std"]
        == pytest.approx(alone["reward/std"])
        == pytest.approx(statistics.pstdev([1, 0, 0.5, 2, 0]))
    )


@pytest.fixture
def make_reward_batch():
    from conftest import make_batch

    def build(rewards: list[float]):
        rows = len(rewards)
        return make_batch(
            torch.ones(rows, 2, dtype=torch.long),
            torch.ones(rows, 2, dtype=torch.long),
            torch.ones(rows, 3, dtype=torch.long),
            torch.ones(rows, 3, dtype=torch.long),
            rewards=torch.tensor(rewards),
        )

    return build


def reward_config(tiny_config, name: str, reward: dict | None, kl_coef: float = 1.0, teacher: bool = True) -> dict:
    raw = {
        **tiny_config,
        "run": {**tiny_config["run"], "output_dir": str(tiny_config["run"]["output_dir"] + name), "max_steps": 3},
        "loss": {"kl_coef": kl_coef},
        "reward": reward,
    }
    if not teacher:
        raw.pop("teacher")
    return raw


def test_a_zero_coefficient_on_either_side_equals_the_pure_run_bit_for_bit(tiny_config):
    quiet = {"log": lambda *_: None}
    pure_distillation = train(validate(reward_config(tiny_config, "distill", None)), **quiet)
    with_zero_reward = train(
        validate(reward_config(tiny_config, "zero-reward", {"verifier": "gsm8k", "coef": 0})), **quiet
    )
    assert final_weights(with_zero_reward.output_dir).keys() == final_weights(pure_distillation.output_dir).keys()
    for name, value in final_weights(pure_distillation.output_dir).items():
        assert torch.equal(value, final_weights(with_zero_reward.output_dir)[name]), name
    rows = read_metrics(with_zero_reward.output_dir / "metrics.jsonl")
    assert all(0 <= row["reward/mean"] <= 1 for row in rows if row["step"] > 0)  # reported, not trained on
    assert "eval/reward/mean" in rows[-1]

    pure_rl = train(
        validate(reward_config(tiny_config, "rl", {"verifier": "gsm8k"}, kl_coef=0, teacher=False)), **quiet
    )
    rl_with_a_teacher = train(
        validate(reward_config(tiny_config, "rl-teacher", {"verifier": "gsm8k"}, kl_coef=0)), **quiet
    )
    rl_weights, watched = final_weights(pure_rl.output_dir), final_weights(rl_with_a_teacher.output_dir)
    assert all(torch.equal(value, watched[name]) for name, value in rl_weights.items())  # the teacher only watched
    assert not all(
        torch.equal(value, final_weights(pure_distillation.output_dir)[name]) for name, value in rl_weights.items()
    )
    assert "distill/reverse_kl" in read_metrics(rl_with_a_teacher.output_dir / "metrics.jsonl")[-1]


def test_verifier_mistakes_are_one_line_errors_naming_it(tiny_config, tmp_path, monkeypatch):
    module = tmp_path / "my_rewards.py"
    module.write_text(
        "def fails(completion, row):\n    raise KeyError('score')\n\n"
        "def wordy(completion, row):\n    return 'high'\n\n"
        "def exact(completion, row):\n    return row['answer'].endswith(completion)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("opd.train.setup.load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    for spec, message in (
        ("no_such_module:score", r"^reward.verifier: cannot import no_such_module \(ModuleNotFound"),
        ("my_rewards:missing", r"^reward.verifier: my_rewards has no function missing$"),
    ):
        with pytest.raises(ConfigError, match=message):
            prepare(validate(reward_config(tiny_config, spec, {"verifier": spec})), resume=False, log=lambda *_: None)
    with pytest.raises(
        ConfigError,
        match=r"reward.verifier: expected a built-in verifier \(gsm8k\) or a function as package.module:function "
        r"\(got .not a name.\)",
    ):
        validate(reward_config(tiny_config, "bad", {"verifier": "not a name"}))
    unanswered = tmp_path / "unanswered.jsonl"
    unanswered.write_text(json.dumps({"prompt": "1 + 1 ="}) + "\n")
    raw = reward_config(tiny_config, "unanswered", {"verifier": "gsm8k"})
    raw["data"] = {**raw["data"], "train": str(unanswered), "eval": None}
    with pytest.raises(
        DataError, match=r"unanswered.jsonl:1: reward.verifier gsm8k needs an 'answer' ending in '#### N'"
    ):
        prepare(validate(raw), resume=False, log=lambda *_: None)
    row = Example(prompt="3 + 4 =", messages=None, answer="#### 7", line=1, fields={"answer": "#### 7"})
    assert RewardScorer("my_rewards:exact", tokenizer=None).grade("7", row) == 1.0  # a bool counts as 0 or 1
    for value, expected in (
        (torch.tensor(0.25), 0.25),
        (__import__("numpy").float32(0.5), 0.5),
        (__import__("numpy").bool_(True), 1.0),
    ):
        assert RewardScorer._number(value) == expected
    for value in (10**400, float("nan"), "1.0", None, [1.0]):
        with pytest.raises(RewardFailed, match=r"not a finite number$"):
            scorer = RewardScorer("my_rewards:exact", tokenizer=None)
            scorer.verifier = lambda completion, fields, value=value: value
            scorer.grade("7", row)
    scorer.verifier = lambda completion, fields: 1 / 0 if completion else ValueError("x\ny")
    with pytest.raises(RewardFailed, match=r"raised ZeroDivisionError on :1: division by zero$"):
        scorer.grade("7", row)
    with pytest.raises(RewardFailed, match=r"^reward.verifier my_rewards:wordy returned 'high' \(str\) on :1, not a"):
        RewardScorer("my_rewards:wordy", tokenizer=None).grade("7", row)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "function, message",
    [
        ("fails", r"reward.verifier my_rewards:fails raised KeyError on \S+\.jsonl:\d+: 'score'"),
        # graded on the scoring thread (rollout.max_staleness 1): the same line
        ("wordy", r"reward.verifier my_rewards:wordy returned 'high' \(str\) on \S+\.jsonl:\d+, not a finite number"),
    ],
)
def test_a_verifier_failing_at_a_step_stops_the_run_in_one_line_without_a_final_model(
    tiny_config, tmp_path, function, message
):
    (tmp_path / "my_rewards.py").write_text(
        "def fails(completion, row):\n    raise KeyError('score')\n\ndef wordy(completion, row):\n    return 'high'\n"
    )
    raw = reward_config(tiny_config, function, {"verifier": f"my_rewards:{function}"})
    raw["rollout"] = {**raw["rollout"], "max_staleness": int(function == "wordy")}
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw))
    result = run_cli("train", str(config), env={"PYTHONPATH": f"{tmp_path}:{':'.join(sys.path)}"})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / f"run{function}" / "final").exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"loss": {"kind": "forward_kl"}},
            r"reward: adds its advantage to reverse_kl_pg's, a policy gradient \(loss.kind=forward_kl\)",
        ),
        ({"rollout": {"samples_per_prompt": 1}}, r"reward: .* needs rollout.samples_per_prompt >= 2 \(got 1\)"),
        (
            {"loss": {"kl_coef": 0}, "reward": {"verifier": "gsm8k", "coef": 0}},
            r"reward.coef=0 and loss.kl_coef=0 \(no forward-KL term, no mixture\) leave",
        ),
    ],
)
def test_reward_settings_that_cannot_train_are_config_errors(tiny_config, changes, message):
    raw = {**tiny_config, "reward": {"verifier": "gsm8k"}, "batch": {"prompts_per_step": 2, "micro_batch_size": 2}}
    raw.update({section: {**raw.get(section, {}), **values} for section, values in changes.items()})
    with pytest.raises(ConfigError, match=message):
        validate(raw)
    if "kl_coef" in changes.get("loss", {}):  # a reward only reported beside a forward-KL term still trains
        validate({**raw, "loss": {**raw["loss"], "forward_kl_coef": 1.0}})


def test_routed_teachers_report_each_ones_reward_and_it_is_its_rows_grades(tiny_config, tiny_data, tmp_path):
    from teachers.test_routing import two_teacher_config

    from opd.train.metrics import per_teacher_metrics
    from opd.train.step import train_step

    config = validate({**two_teacher_config(tiny_config, tiny_data, tmp_path), "reward": {"verifier": "gsm8k"}})
    session = prepare(config, resume=False, log=lambda *_: None)
    batch = session.rewards.attach(session.rollouts.sample(session.train_prompts.batch(list(range(16))), 2, 0, step=1))
    figures = per_teacher_metrics(session.teacher, session.teacher.score(batch).attach(batch), session.world)
    for name in ("a", "b"):
        mine = [reward for reward, row in zip(batch.rewards.tolist(), batch.rows) if row.teacher == name]
        assert figures[f"reward/mean/{name}"] == pytest.approx(statistics.fmean(mine))
        assert figures[f"reward/std/{name}"] == pytest.approx(statistics.pstdev(mine))
    metrics, _ = train_step(session, step=1)
    assert {"reward/mean", "reward/std", "reward/mean/a", "reward/mean/b"} <= set(metrics)


@pytest.mark.parametrize("chunked", [False, True], ids=["per token", "chunks of another tokenizer"])
def test_the_advantage_is_the_distillation_one_plus_the_rewards_spread_over_each_completion(chunked):
    from opd.objectives.kinds import PolicyGradient
    from opd.objectives.losses import chunk_advantages, discounted_advantages

    from conftest import make_batch

    generator = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    student, teacher = -torch.rand(4, 4, generator=generator), -torch.rand(4, 4, generator=generator)
    chunk_index = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 1, 1, 2], [-1, 0, 0, 0]]) if chunked else None
    batch = make_batch(
        torch.ones(4, 1, dtype=torch.long),
        torch.ones(4, 1, dtype=torch.long),
        torch.ones(4, 4, dtype=torch.long),
        mask,
        sampler_logprobs=student * mask,
        prompt_index=torch.tensor([0, 0, 1, 1]),
        teacher_logprobs=teacher * mask,
        chunk_index=chunk_index,
        rewards=torch.tensor([1.0, 0.0, 0.5, 0.5]),
    )
    objective = PolicyGradient(1.0, 0, 1.0, None, kl_coef=0.7, discount=0.5, reward_coef=2.0)
    distillation = (
        chunk_advantages(student * mask, teacher * mask, chunk_index, mask, 0.7, 0.5)
        if chunked
        else discounted_advantages(student * mask, teacher * mask, mask, 0.7, 0.5)
    )
    spread = torch.tensor([[1.0], [-1.0], [0.0], [0.0]])  # 2 x (r - the prompt's mean): +-0.5, and 0 for equal rewards
    torch.testing.assert_close(objective.prepare(batch).advantages, distillation + spread * mask)
