"""Scoring as the sampler finishes each prompt's group: the sampler hands over every row once, as it
was returned, earlier for groups that stop earlier; the teacher gets one call at a time, the groups
that finished meanwhile together; the assembled scores are the whole batch's."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from opd.data.prompts import load_prompts
from opd.demo.run import ASSETS
from opd.models.loading import load_model
from opd.ops.batch import StepBatch
from opd.rollout.sampler import ModelSampler, SamplingSettings
from opd.teachers.base import TeacherScores
from opd.train.step import StreamedScores

from conftest import CPU, write_problems


def demo_sample(tmp_path, on_groups=None) -> StepBatch:
    student = load_model(str(ASSETS / "student"), "student", CPU.device)
    prompts = load_prompts(str(write_problems(tmp_path / "p.jsonl", 6, seed=3)), "data", student.tokenizer, 64)
    sampler = ModelSampler(student, SamplingSettings(40, 1.0, 0, 1.0), CPU)
    return sampler.sample(prompts.batch(list(range(6))), 3, seed=0, **({"on_groups": on_groups} if on_groups else {}))


def test_the_sampler_hands_over_each_group_as_it_finishes_and_returns_the_same_batch(tmp_path):
    handed = []
    batch = demo_sample(tmp_path, lambda rows, part: handed.append((rows, part)))
    assert sorted(row for rows, _ in handed for row in rows) == list(range(len(batch)))
    for rows, part in handed:
        expected = batch.select(rows)
        for name in ("completion_ids", "completion_mask", "sampler_logprobs", "prompt_ids", "sampler_entropy"):
            torch.testing.assert_close(getattr(part, name), getattr(expected, name), atol=0, rtol=0, msg=name)
        assert part.rows == expected.rows
    assert len(handed) > 1 and handed[0][1].completion_ids.shape[1] < batch.completion_ids.shape[1]  # early ones
    plain = demo_sample(tmp_path)  # the callback changes nothing the sampler returns
    torch.testing.assert_close(plain.completion_ids, batch.completion_ids, atol=0, rtol=0)


class SlowScorer:
    """ℓᵀ = -(token id) at every completion token; each call takes 50 ms and is recorded."""

    name = "slow"

    def __init__(self):
        self.calls, self.lock = [], threading.Lock()

    def score(self, batch, keep_hidden=False):
        with self.lock:
            self.calls.append(len(batch))
        time.sleep(0.05)
        return TeacherScores(logprobs=-(batch.completion_ids * batch.completion_mask).float())


def test_groups_go_at_once_while_there_is_room_then_together_and_the_scores_are_the_whole_batchs(tmp_path):
    batch = demo_sample(tmp_path)
    scorer = SlowScorer()
    with ThreadPoolExecutor(2) as pool:
        streamed = StreamedScores(scorer, pool, pad_id=0, max_calls=2)
        for group in range(6):  # six groups of three rows, finishing 5 ms apart; each call takes 50 ms
            rows = [3 * group + sample for sample in range(3)]
            streamed(rows, batch.select(rows))
            time.sleep(0.005)
        scores = streamed.collect(batch)
    assert sum(scorer.calls) == len(batch)
    assert scorer.calls[:2] == [3, 3]  # the first two groups went alone, at once
    assert len(scorer.calls) < 6  # the groups that finished while both calls were out went together
    whole = -(batch.completion_ids * batch.completion_mask).float()
    torch.testing.assert_close(scores.logprobs, whole, atol=0, rtol=0)
