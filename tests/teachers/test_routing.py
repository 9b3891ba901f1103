"""Several named teachers: each row scored by its own (by its `teacher` field or its file), checked
against each teacher scoring the whole batch; per-teacher metrics; unknown teachers refused early."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opd.config.files import validate
from opd.errors import DataError
from opd.train.metrics import per_teacher_metrics, rollout_metrics
from opd.train.setup import prepare
from opd.train.step import train_step

from conftest import make_tiny_model


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def two_teacher_config(
    tiny_config, tiny_data, tmp_path, rows_b: list[dict] | None = None, other_hidden: int = 48
) -> dict:
    other = make_tiny_model(tmp_path / "other-teacher", hidden=other_hidden, layers=1, seed=9)
    rows = [json.loads(line) for line in Path(tiny_data["train"]).read_text().splitlines()]
    file_a = write(tmp_path / "a.jsonl", rows[:8])
    # File b names teacher b; two of its rows ask for teacher a themselves.
    file_b = write(
        tmp_path / "b.jsonl", rows_b or [{**row, "teacher": "a"} if i < 2 else row for i, row in enumerate(rows[8:16])]
    )
    raw = {
        **tiny_config,
        "teachers": [{"name": "a", "path": tiny_config["teacher"]["path"]}, {"name": "b", "path": str(other)}],
        "data": {
            **tiny_config["data"],
            "train": [{"path": str(file_a), "teacher": "a"}, {"path": str(file_b), "teacher": "b"}],
            "eval": None,
        },
        "batch": {"prompts_per_step": 8, "micro_batch_size": 4},
        "rollout": {"samples_per_prompt": 2, "max_new_tokens": 6},
    }
    del raw["teacher"]
    return raw


def test_each_row_is_scored_by_its_own_teacher(tiny_config, tiny_data, tmp_path):
    config = validate(two_teacher_config(tiny_config, tiny_data, tmp_path))
    session = prepare(config, resume=False, log=lambda *_: None)
    routes = [example.teacher for example in session.train_prompts.examples]
    assert routes == ["a"] * 8 + ["a", "a"] + ["b"] * 6
    prompts = session.train_prompts.batch(list(range(16)))
    batch = session.rollouts.sample(prompts, 2, 0, step=1)
    scores = session.teacher.score(batch)
    scored = scores.attach(batch)
    parts = {name: part for name, _, _, part in session.teacher.parts(batch)}
    assert scores.flops == sum(session.teacher.scorers[name].score(part).flops for name, part in parts.items()) > 0
    for name, teacher in session.teacher.scorers.items():  # brute force: each teacher on the whole batch
        whole = teacher.score(batch).logprobs
        rows = [i for i, row in enumerate(batch.rows) if row.teacher == name]
        assert rows
        torch.testing.assert_close(scored.teacher_logprobs[rows], whole[rows], atol=1e-6, rtol=0)
    assert not torch.allclose(
        session.teacher.scorers["a"].score(batch).logprobs, session.teacher.scorers["b"].score(batch).logprobs
    )  # they disagree
    figures = per_teacher_metrics(session.teacher, scored, session.world)
    rows_b = [i for i, row in enumerate(batch.rows) if row.teacher == "b"]
    expected = rollout_metrics(scored.select(rows_b))["distill/reverse_kl"]
    assert figures["distill/reverse_kl/b"] == pytest.approx(expected, rel=1e-6)
    metrics, _ = train_step(session, step=1)
    assert {"distill/reverse_kl/a", "distill/reverse_kl/b", "logprob/teacher/a"} <= set(metrics)


def test_each_position_gets_its_own_teachers_whole_distribution(tiny_config, tiny_data, tmp_path):
    """Teachers of different widths (H 48 and 32): their hidden states travel padded and tagged with the
    row's teacher, and each position's logits are its own teacher's, as each teacher alone gives them.
    The default's forward-KL term is on, as with one teacher."""
    config = validate(two_teacher_config(tiny_config, tiny_data, tmp_path, other_hidden=32))
    session = prepare(config, resume=False, log=lambda *_: None)
    assert session.config.loss.forward_kl_coef == 1.0
    batch = session.rollouts.sample(session.train_prompts.batch(list(range(16))), 2, 0, step=1)
    scores = session.teacher.score(batch, keep_hidden=True)
    assert scores.hidden.shape[-1] == 48 + 1
    logits = session.teacher.logits(scores.hidden)  # (B, T, V)
    mask = batch.completion_mask.bool()
    for name, teacher in session.teacher.scorers.items():
        rows = [i for i, row in enumerate(batch.rows) if row.teacher == name]
        expected = teacher.logits(teacher.score(batch, keep_hidden=True).hidden[rows])
        torch.testing.assert_close(logits[rows][mask[rows]], expected[mask[rows]], atol=1e-5, rtol=0)
    metrics, _ = train_step(session, step=1)  # the update's forward-KL term reads the tagged states
    assert torch.isfinite(torch.tensor(metrics["loss"]))


def test_a_row_naming_an_unknown_teacher_is_an_error_with_its_file_and_line(
    tiny_config, tiny_data, tmp_path, monkeypatch
):
    rows = [json.loads(line) for line in Path(tiny_data["train"]).read_text().splitlines()][:4]
    rows[2]["teacher"] = "c"
    raw = two_teacher_config(tiny_config, tiny_data, tmp_path, rows_b=rows)
    monkeypatch.setattr("opd.train.setup.load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(
        DataError, match=r"data.train: .*b.jsonl:3: teacher 'c' is not one of the teachers \['a', 'b'\]"
    ):
        prepare(validate(raw), resume=False, log=lambda *_: None)
    raw["data"]["train"] = raw["data"]["train"][1]["path"]  # one file without a teacher: rows must name theirs
    with pytest.raises(DataError, match=r"b.jsonl:1: the row names no teacher"):
        prepare(validate(raw), resume=False, log=lambda *_: None)


def test_the_teachers_score_their_parts_at_once(tiny_config, tiny_data, tmp_path):
    """Each teacher waits, inside its score, until the other has started: scored one after the other, the
    first would wait alone past the barrier's timeout. The scores are each teacher's own."""
    import threading

    config = validate(two_teacher_config(tiny_config, tiny_data, tmp_path))
    session = prepare(config, resume=False, log=lambda *_: None)
    batch = session.rollouts.sample(session.train_prompts.batch(list(range(16))), 2, 0, step=1)
    expected = session.teacher.score(batch).logprobs
    both_started = threading.Barrier(2, timeout=20)

    class Meeting:
        def __init__(self, scorer):
            self.scorer = scorer

        def score(self, part, keep_hidden=False):
            both_started.wait()
            return self.scorer.score(part, keep_hidden)

    session.teacher.scorers = {name: Meeting(scorer) for name, scorer in session.teacher.scorers.items()}
    torch.testing.assert_close(session.teacher.score(batch).logprobs, expected, atol=0, rtol=0)
