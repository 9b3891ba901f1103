"""The step's batch and where its rows come from: select trims every field alike, rank shares of the
prompt stream are distinct and exhaustive, and dataset answers are found by row, not by prompt text."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch

from opd.data.prompts import PromptStream, load_prompts
from opd.demo.tokenizer import build_tokenizer
from opd.ops.batch import STUDENT, TEACHER, StepBatch
from opd.rollout.answers import DatasetAnswers

from conftest import make_batch


def full_batch() -> StepBatch:
    """3 rows: prompts of 2, 4 and 3 real tokens (left-padded to 5); completions of 2, 1 and 3 tokens
    (right-padded to 6); every optional field filled with values that tell their position apart."""
    prompt_mask = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    completion_mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    position = torch.arange(18.0).view(3, 6)  # row * 6 + column
    return make_batch(
        torch.arange(15).view(3, 5),
        prompt_mask,
        torch.arange(18).view(3, 6),
        completion_mask,
        sampler_logprobs=-position,
        finished=torch.tensor([True, True, False]),
        prompt_index=torch.tensor([0, 0, 1]),
        teacher_logprobs=-2 * position,
        teacher_hidden=position[..., None].expand(3, 6, 4).clone(),
        teacher_topk_ids=position.long()[..., None].expand(3, 6, 2).clone(),
        teacher_topk_logprobs=-position[..., None].expand(3, 6, 2).clone(),
        advantages=3 * position,
        sampler_entropy=position / 10,
        teacher_entropy=position / 20,
        chunk_index=position.long(),
        rewards=torch.tensor([1.0, 0.0, 0.5]),
    ).replace(rows=["row a", "row b", "row c"], source=torch.tensor([STUDENT, TEACHER, STUDENT]))


def test_select_trims_every_field_to_the_rows_and_columns_they_use():
    batch = full_batch()
    part = batch.select([0, 1])  # prompts use columns 1..4, completions columns 0..1
    assert part.prompt_ids.tolist() == [[1, 2, 3, 4], [6, 7, 8, 9]]
    assert part.completion_ids.tolist() == [[0, 1], [6, 7]]
    assert part.rows == ["row a", "row b"] and part.row_index.tolist() == [0, 0]
    assert part.finished.tolist() == [True, True] and part.source.tolist() == [STUDENT, TEACHER]
    expected = torch.tensor([[0.0, 1.0], [6.0, 7.0]])
    torch.testing.assert_close(part.sampler_logprobs, -expected)
    torch.testing.assert_close(part.teacher_logprobs, -2 * expected)
    torch.testing.assert_close(part.advantages, 3 * expected)
    torch.testing.assert_close(part.teacher_hidden, expected[..., None].expand(2, 2, 4))
    torch.testing.assert_close(part.sampler_entropy, expected / 10)
    assert part.teacher_topk_ids.shape == (2, 2, 2) and part.teacher_topk_logprobs.shape == (2, 2, 2)
    for spec in fields(StepBatch):  # no field left untrimmed: every completion-layout field has width 2
        value = getattr(part, spec.name)
        if spec.metadata["layout"] == "completion":
            assert value.shape[:2] == (2, 2), spec.name
        if spec.metadata["layout"] == "row":
            assert len(value) == 2, spec.name


def test_a_chunk_reads_each_field_at_the_same_token_positions():
    batch = full_batch()
    index = next(batch.token_chunks(4))  # the first four completion tokens inside the mask
    assert index.tolist() == [0, 1, 6, 12]
    chunk = batch.tokens_at(index)
    assert chunk.tokens.tolist() == [0, 1, 6, 12]
    torch.testing.assert_close(chunk.advantages, 3 * torch.tensor([0.0, 1.0, 6.0, 12.0]))
    torch.testing.assert_close(chunk.teacher_hidden[:, 0], torch.tensor([0.0, 1.0, 6.0, 12.0]))
    assert chunk.source.tolist() == [STUDENT, STUDENT, TEACHER, STUDENT]
    assert [len(c) for c in batch.token_chunks(4)] == [4, 2]  # 6 tokens in all


def test_concat_pads_each_field_by_its_layout_and_keeps_prompt_groups_apart():
    batch = full_batch()
    first, second = batch.select([0, 1]), batch.select([2])
    joined = StepBatch.concat([first, second], pad_id=99)
    assert joined.prompt_ids.shape == (3, 4) and joined.completion_ids.shape == (3, 3)
    assert joined.prompt_ids[:2].tolist() == first.prompt_ids.tolist()
    assert joined.prompt_ids[2].tolist() == [99, 12, 13, 14] and joined.prompt_mask[2].tolist() == [0, 1, 1, 1]
    assert joined.completion_ids[:2, 2].tolist() == [99, 99] and joined.completion_mask[:2, 2].tolist() == [0, 0]
    index = joined.prompt_index.tolist()
    assert index[0] == index[1] != index[2]  # row 2 keeps a group of its own
    assert joined.source.tolist() == [STUDENT, TEACHER, STUDENT] and joined.rows == ["row a", "row b", "row c"]
    torch.testing.assert_close(joined.advantages[:2, :2], first.advantages)
    assert joined.teacher_hidden.shape == (3, 3, 4) and joined.teacher_hidden[0, 2].abs().sum() == 0
    assert StepBatch.concat([batch], pad_id=0) is batch


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [True, False])
def test_rank_shares_are_distinct_and_together_are_the_single_process_steps(world_size, shuffle):
    """Each rank takes `count` prompts per step; across ranks the shares are disjoint and their union is
    what one process taking count * world_size prompts gets, over epoch boundaries too (11 prompts)."""
    count, steps = 2, 9
    single = PromptStream(11, seed=5, shuffle=shuffle)
    ranks = [PromptStream(11, seed=5, shuffle=shuffle) for _ in range(world_size)]
    for _ in range(steps):
        whole = single.take(count * world_size)
        shares = [stream.take(count, rank, world_size) for rank, stream in enumerate(ranks)]
        assert all(len(share) == count for share in shares)
        assert sorted(sum(shares, [])) == sorted(whole)  # exhaustive, and with sizes equal, disjoint
        assert shares == [whole[rank::world_size] for rank in range(world_size)]
    assert all(stream.consumed == single.consumed == count * world_size * steps for stream in ranks)


def test_every_prompt_is_seen_once_per_epoch_and_epochs_reshuffle():
    stream = PromptStream(6, seed=1)
    first, second = stream.take(6), stream.take(6)
    assert sorted(first) == sorted(second) == list(range(6)) and first != second
    resumed = PromptStream(6, seed=1, consumed=6)
    assert resumed.take(6) == second
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        PromptStream(6, seed=1).take(1, rank=2, world_size=2)


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_step_sampled_ahead_of_its_update_is_neither_lost_nor_repeated_on_resume(world_size):
    """The stream's state counts what the updates consumed: a step taken for sampling but not yet used
    when a checkpoint is written is taken again, with the same prompts and keys, by the resumed run."""
    stream = PromptStream(7, seed=3)
    first = stream.take_step(2, 0, world_size)
    ahead = stream.take_step(2, 0, world_size)  # sampled while the first step's update runs
    stream.consume(first)
    checkpoint = stream.consumed  # what trainer.save records
    assert (checkpoint, stream.taken) == (2 * world_size, 4 * world_size)
    resumed = PromptStream(7, seed=3, consumed=checkpoint)
    again = resumed.take_step(2, 0, world_size)
    assert (again.indices, again.keys, again.positions) == (ahead.indices, ahead.keys, ahead.positions)
    later = stream.take_step(2, 0, world_size)
    with pytest.raises(ValueError, match="consumed in the order they were taken"):
        stream.consume(later)  # before `ahead`: its prompts would be skipped
    stream.consume(ahead)
    stream.consume(later)
    assert stream.consumed == stream.taken == 6 * world_size


def test_dataset_answers_are_found_by_row_so_duplicate_prompts_keep_their_own(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [
        {"prompt": "Question : Tom has 2 pens .", "answer": "#### 2", "source": "first"},
        {"prompt": "Question : Tom has 2 pens .", "answer": "#### 3", "source": "second"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = build_tokenizer()
    prompts = load_prompts(str(path), "data.train", tokenizer, 64)
    assert prompts.token_ids[0] == prompts.token_ids[1]
    batch = DatasetAnswers(prompts, tokenizer, 8, torch.device("cpu")).sample(prompts.batch([1, 0]), 2, 0)
    texts = [
        tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
        for ids, mask in zip(batch.completion_ids, batch.completion_mask)
    ]
    assert texts == ["#### 3", "#### 3", "#### 2", "#### 2"]
    assert batch.row_index.tolist() == [1, 1, 0, 0]
    assert [row.fields["source"] for row in batch.rows] == ["second", "second", "first", "first"]  # the whole row
