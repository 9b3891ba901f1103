"""The data set's own answers as a step's completions, for SFT on them (`opd sft`, `rollout.source: dataset`)."""

from __future__ import annotations

import torch

from opd.ops.batch import DATASET, StepBatch, left_pad, right_pad
from opd.data.prompts import PromptBatch, PromptSet
from opd.errors import DataError


class DatasetAnswers:
    """A Sampler that replays each row's `answer`: tokenized once per row, cut to max_new_tokens and
    closed with EOS. Rows are found by their position in the PromptSet, so two rows with the same
    prompt keep their own answers. sampler_logprobs are 0: no model drew these tokens."""

    source = DATASET

    @staticmethod
    def check(prompts: PromptSet) -> None:
        """Every row must carry an answer: checked before any weight loads."""
        for example in prompts.examples:
            if example.answer is None:
                raise DataError(f"{prompts.source}:{example.line}: rollout.source=dataset needs an 'answer' on every row")

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

    def sample(self, prompts: PromptBatch, samples_per_prompt: int, seed: int) -> StepBatch:
        def each(values: list) -> list:  # one entry per row: a prompt's samples are consecutive
            return [value for value in values for _ in range(samples_per_prompt)]

        answers = [self.answers[index] for index in each(prompts.row_index)]
        prompt_ids, prompt_mask = left_pad(each(prompts.token_ids), self.pad_id, self.device)  # (B, P)
        completion_ids, completion_mask = right_pad([answer[: self.max_new_tokens] for answer in answers],
                                                    self.pad_id, self.device)  # (B, T)
        return StepBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
            completion_mask=completion_mask, sampler_logprobs=torch.zeros(completion_ids.shape, device=self.device),
            finished=torch.tensor([len(answer) <= self.max_new_tokens for answer in answers], device=self.device),
            prompt_index=torch.arange(len(prompts), device=self.device).repeat_interleave(samples_per_prompt),
            row_index=torch.tensor(each(prompts.row_index), device=self.device),
            rows=each(prompts.rows),
            source=torch.full((len(answers),), DATASET, dtype=torch.long, device=self.device),
        )
