"""The data set's own answers as a step's completions, for SFT on them (`opd sft`, `rollout.source: dataset`)."""

from __future__ import annotations

import torch

from opd.data.prompts import PromptBatch, PromptSet
from opd.errors import DataError
from opd.ops.batch import DATASET, StepBatch, right_pad
from opd.rollout.sampler import completions_batch


class DatasetAnswers:
    """A Sampler that replays each row's `answer`: tokenized once per row, cut to max_new_tokens and
    closed with EOS. Rows are found by their position in the PromptSet, so two rows with the same
    prompt keep their own answers. sampler_logprobs are 0: no model drew these tokens."""

    source = DATASET
    gives_entropy = False  # no distribution drew these tokens

    @staticmethod
    def check(prompts: PromptSet) -> None:
        """Every row must carry an answer: checked before any weight loads."""
        for example in prompts.examples:
            if example.answer is None:
                raise DataError(f"{prompts.path}:{example.line}: rollout.source=dataset needs an 'answer' on every row")

    @staticmethod
    def answered(prompts: PromptSet) -> bool:
        """Every row carries an answer (check, without the error)."""
        return all(example.answer is not None for example in prompts.examples)

    def __init__(self, prompts: PromptSet, tokenizer, max_new_tokens: int, device: torch.device):
        self.check(prompts)
        self.max_new_tokens, self.device, self.pad_id = max_new_tokens, device, tokenizer.pad_token_id
        self.answers: list[list[int]] = []  # by PromptSet position
        for example in prompts.examples:
            # A plain-text prompt ends in "Answer:"; the answer then starts after a space.
            text = example.answer
            if not (text[:1].isspace() or getattr(tokenizer, "chat_template", None)):
                text = " " + text
            self.answers.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])

    def sampling_flops(self, batch: StepBatch) -> float:
        return 0.0  # no model ran

    def sync_weights(self, version: int) -> None:
        return None

    def close(self) -> None:
        return None

    def sample(self, prompts: PromptBatch, samples_per_prompt: int, seed: int) -> StepBatch:
        def each(values: list) -> list:  # one entry per row: a prompt's samples are consecutive
            return [value for value in values for _ in range(samples_per_prompt)]

        answers = [self.answers[index] for index in each(prompts.row_index)]
        completion_ids, completion_mask = right_pad(
            [answer[: self.max_new_tokens] for answer in answers], self.pad_id, self.device
        )  # (B, T)
        finished = torch.tensor([len(answer) <= self.max_new_tokens for answer in answers], device=self.device)
        return completions_batch(
            prompts,
            samples_per_prompt,
            self.pad_id,
            completion_ids,
            completion_mask,
            torch.zeros(completion_ids.shape, device=self.device),
            finished,
            DATASET,
        )
