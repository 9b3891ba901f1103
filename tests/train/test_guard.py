"""Seeing collapse: the entropy and repetition figures against references, the guard's rule, and the
guard on a forced collapse (warn continues, stop ends before the update like a NaN does)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from opd.config.files import validate
from opd.errors import StudentCollapsed
from opd.io.checkpoint import latest_checkpoint
from opd.io.sinks import read_metrics
from opd.ops.logprobs import entropy, token_logprobs, token_logprobs_and_entropy
from opd.train.guard import CollapseGuard
from opd.train.metrics import repetition
from opd.train.trainer import train


def test_entropy_matches_the_definition_with_zero_probability_entries():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, float("-inf"), float("-inf"), 1.0], [3.0, float("-inf"), 0, 0]])
    expected = []
    for row in logits.tolist():
        weights = [math.exp(x) for x in row]
        probs = [w / sum(weights) for w in weights]
        expected.append(-sum(p * math.log(p) for p in probs if p > 0))
    torch.testing.assert_close(entropy(logits), torch.tensor(expected), atol=1e-6, rtol=1e-6)
    tokens = torch.tensor([2, 0, 3])
    logprobs, shared = token_logprobs_and_entropy(logits, tokens)  # one logsumexp for both
    torch.testing.assert_close(shared, entropy(logits))
    torch.testing.assert_close(logprobs, token_logprobs(logits, tokens))
    assert entropy(logits)[1] == pytest.approx(math.log(2))


def test_repetition_counts_ngrams_that_repeat_an_earlier_one_in_the_same_completion():
    ids = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4, 9], [5, 5, 5, 5, 5, 5, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 9])
    # row 0: 6 four-grams, (1,2,3,4) again at 4 -> 1 repeat; row 1: 3 four-grams, 2 repeats; row 2: none of 6
    assert repetition(ids, mask) == pytest.approx((1 + 2 + 0) / (6 + 3 + 6))
    assert repetition(ids[1:2], mask[1:2]) == pytest.approx(2 / 3)  # padding after EOS never counts
    assert repetition(ids[:, :3], mask[:, :3]) == 0.0  # shorter than n: nothing to repeat


def guard(**overrides) -> CollapseGuard:
    settings = dict(mode="warn", entropy_fraction=0.2, reference="start", max_repetition=0.5, patience=3)
    return CollapseGuard(**{**settings, **overrides})


def test_the_guard_fires_after_patience_collapsed_steps_in_a_row_and_not_before():
    rule = guard()
    healthy, low = {"entropy/student": 2.0, "generation/repetition": 0.0}, {"entropy/student": 0.3}
    assert rule.check(1, healthy) is None and rule.start_entropy == 2.0
    assert [rule.check(step, low) for step in (2, 3)] == [None, None]
    assert rule.check(4, healthy) is None and rule.streak == 0  # a healthy step resets the count
    assert [rule.check(step, low) for step in (5, 6)] == [None, None]
    message = rule.check(7, low)
    assert (
        "collapsed for 3 steps in a row" in message
        and "entropy/student 0.3 is below 0.2x its first step's 2" in message
    )
    assert "repetition" not in message  # only what fired is cited
    assert rule.check(8, {"entropy/student": 2.0, "generation/repetition": 0.9}) is None  # still counting: 4
    assert rule.streak == 4


def test_the_guard_reads_repetition_and_the_teachers_entropy_and_can_be_off():
    rule = guard(patience=1)
    rule.check(1, {"entropy/student": 2.0})
    repeating = rule.check(2, {"entropy/student": 1.9, "generation/repetition": 0.8})
    assert "generation/repetition 0.80 is above 0.5" in repeating and "entropy" not in repeating.split(":", 1)[1]
    versus_teacher = guard(reference="teacher", patience=1)
    assert versus_teacher.check(1, {"entropy/student": 0.3, "entropy/teacher": 1.0}) is None  # above 0.2 x 1.0
    assert "the teacher's" in versus_teacher.check(2, {"entropy/student": 0.1, "entropy/teacher": 1.0})
    assert guard(mode="off", patience=1).check(1, {"entropy/student": 0.0}) is None
    assert guard(patience=1).check(1, {"loss": 1.0}) is None  # no student samples (SFT): nothing to judge


def collapse_checkpoint(folder: Path) -> None:
    """Make the student's next-token distribution nearly one-hot: its LM head x 100 (the DCP state
    rewritten through a plain torch.save file)."""
    from torch.distributed.checkpoint.format_utils import torch_save_to_dcp

    from conftest import checkpoint_state

    plain = folder.parent / "plain.pt"
    state = checkpoint_state(folder)
    state["model"]["lm_head.weight"] = state["model"]["lm_head.weight"] * 100
    torch.save(state, plain)
    shutil.rmtree(folder / "state")
    torch_save_to_dcp(plain, folder / "state")
    plain.unlink()


@pytest.mark.parametrize("mode", ["stop", "warn"])
def test_a_forced_collapse_trips_the_guard(tiny_config, mode):
    """Two healthy steps, then the checkpoint's student is made to collapse and the run resumed. With
    stop, the guard ends the run at the second collapsed step, before its update, naming the last good
    checkpoint and writing no final/; with warn it prints one line and the run finishes."""
    raw = {
        **tiny_config,
        "run": {**tiny_config["run"], "max_steps": 2, "save_every": 1, "collapse_guard": mode, "collapse_patience": 2},
        "data": {**tiny_config["data"], "eval": None},
        "optim": {"lr": 1e-3, "schedule": "constant"},
    }
    train(validate(raw), log=lambda *_: None)
    output_dir = Path(raw["run"]["output_dir"])
    collapse_checkpoint(output_dir / "checkpoints" / "step-2")
    longer, messages = {**raw, "run": {**raw["run"], "max_steps": 6}}, []
    if mode == "stop":
        with pytest.raises(StudentCollapsed, match=r"step 4: .*collapsed for 2 steps.*entropy/student .*step-3"):
            train(validate(longer), resume=True, log=messages.append)
        assert latest_checkpoint(output_dir).name == "step-3" and not (output_dir / "final").exists()
        assert [row["step"] for row in read_metrics(output_dir / "metrics.jsonl")] == [1, 2, 3]
    else:
        train(validate(longer), resume=True, log=messages.append)
        warnings = [m for m in messages if str(m).startswith("warning: step 4: the student's samples look collapsed")]
        assert len(warnings) == 1 and (output_dir / "final").is_dir()
    rows = read_metrics(output_dir / "metrics.jsonl")
    assert rows[2]["entropy/student"] < 0.2 * rows[0]["entropy/student"]  # the collapse the guard saw


def test_repetition_of_several_batches_combines_as_if_pooled():
    from opd.train.metrics import combine, rollout_metrics

    from conftest import make_batch

    ids = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4, 9, 9], [5, 6, 7, 0, 0, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1] * 10, [1] * 3 + [0] * 7])
    parts = [
        make_batch(
            torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), ids[i : i + 1], mask[i : i + 1]
        )
        for i in range(2)
    ]
    pieces = [(rollout_metrics(part), part.num_tokens, len(part)) for part in parts]
    assert combine(pieces)["generation/repetition"] == pytest.approx(repetition(ids, mask))
