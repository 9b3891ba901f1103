"""The teacher's own view of a rollout: its own prompt, and its own tokens of the student's completion.

A teacher need not read a row the way the student does:
- `teacher.chat_template: own`: the row's messages rendered by the teacher's tokenizer and template,
  with its generation prompt; the student's end-of-turn token becomes the teacher's.
- Privileged context: `data.teacher_system_prompt` and a row's `teacher_context` field (say, the
  reference solution) reach the teacher's prompt only.
- Another tokenizer: the student's completion ids become their exact bytes (`opd.teachers.token_bytes`), the
  teacher encodes its prompt followed by that text in one call, so the seam is tokenized as its
  template would, and the chunk estimator (`opd.teachers.alignment`) maps its scores back onto the student's
  tokens. The student's ids are never re-encoded on the student's side.

`ViewedTeacher` puts a view in front of any TokenScorer (a local model, a server), which then scores
the teacher's sequences as it scores any batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from opd.data.rows import Example
from opd.data.templates import render_prompt
from opd.errors import DataError, ModelError
from opd.models.loading import check_context
from opd.ops.batch import StepBatch, left_pad, right_pad
from opd.teachers.alignment import ChunkAlignment
from opd.teachers.base import TeacherScores, TokenScorer
from opd.teachers.cross_tokenizer import CrossTokenizer, TeacherPrompt

CONTEXT_FIELD = "teacher_context"
ANCHOR_TOKENS = 2  # a completion is encoded after its prompt's last tokens: the seam as in the whole prompt


@dataclass
class ViewSettings:
    """chat_template: "student" or "own"; system_prompt: the teacher's system turn; context_format: where
    a row's teacher_context goes; alignment: "auto" (chunks where the vocabularies differ), "tokens" or
    "chunks"."""

    chat_template: str = "student"
    system_prompt: str | None = None
    context_format: str = "{context}\n\n{prompt}"
    template_kwargs: dict = field(default_factory=dict)
    alignment: str = "auto"
    student_system_prompt: str | None = None  # the student's, to tell whether the teacher's differs


REPLY_MARKER = "opd-reply-marker"


def _rendered_exchange(tokenizer, template_kwargs: dict | None) -> tuple[str, str] | None:
    """A plain exchange through the tokenizer's chat template: the generation prompt after a user turn,
    and that turn followed by an assistant reply REPLY_MARKER; None without a template, or where the
    template can't render it."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    user = [{"role": "user", "content": "hi"}]
    try:
        prompt = tokenizer.apply_chat_template(
            user, add_generation_prompt=True, tokenize=False, **(template_kwargs or {})
        )
        turn = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": REPLY_MARKER}], tokenize=False, **(template_kwargs or {})
        )
    except Exception:  # jinja raises TemplateError and others
        return None
    return (prompt, turn) if REPLY_MARKER in turn else None


def reply_separator(tokenizer, template_kwargs: dict | None = None) -> str:
    """The whitespace a chat template puts between its generation prompt and a reply's text (Llama 2: a
    space after [/INST]; ChatML: none, the newline is in the prompt); "" for anything but whitespace."""
    exchange = _rendered_exchange(tokenizer, template_kwargs)
    if exchange is None or not exchange[1].startswith(exchange[0]):
        return ""
    prompt, turn = exchange
    between = turn[len(prompt) : turn.index(REPLY_MARKER)]
    return between if not between.strip() else ""


def end_of_turn_id(tokenizer, template_kwargs: dict | None = None) -> int:
    """The token that ends an assistant turn in the tokenizer's chat template (`<|im_end|>`,
    `<|eot_id|>`, ...), read from a rendered turn; the EOS token without a template."""
    exchange = _rendered_exchange(tokenizer, template_kwargs)
    if exchange is not None:
        turn = exchange[1]
        after = tokenizer(turn[turn.rindex(REPLY_MARKER) + len(REPLY_MARKER) :], add_special_tokens=False)["input_ids"]
        if after and after[0] in tokenizer.all_special_ids:
            return after[0]
    return tokenizer.eos_token_id


class TeacherView:
    """Builds, for a step's rows, the token sequences the teacher scores (see the module's docstring)."""

    def __init__(self, student_tokenizer, teacher_tokenizer, student_stop_ids: list[int], settings: ViewSettings):
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.settings = settings
        same_vocabulary = student_tokenizer.get_vocab() == teacher_tokenizer.get_vocab()
        if settings.alignment == "tokens" and not same_vocabulary:
            raise ValueError(
                "the teacher's tokenizer differs from the student's, so its tokens can't be matched one "
                "for one (alignment: tokens); use alignment auto or chunks"
            )
        self.chunked = settings.alignment == "chunks" or not same_vocabulary
        self.own_template = settings.chat_template == "own"
        self.stop_ids = torch.tensor(sorted(student_stop_ids))
        self.end_id = (
            end_of_turn_id(teacher_tokenizer, settings.template_kwargs)
            if self.own_template
            else teacher_tokenizer.eos_token_id
        )
        self.renderer = teacher_tokenizer if self.own_template else student_tokenizer
        if self.chunked:
            self.cross = CrossTokenizer(student_tokenizer, teacher_tokenizer, self.stop_ids, self.end_id)
        # Reply separators of two templates, translated across tokenizers (see TeacherPrompt).
        self.separators = (
            (
                reply_separator(teacher_tokenizer, settings.template_kwargs),
                reply_separator(student_tokenizer, settings.template_kwargs),
            )
            if self.own_template and self.chunked
            else ("", "")
        )
        self._prompts: dict[int, tuple] = {}

    @property
    def ends_turns_differently(self) -> bool:
        """A token-for-token view whose teacher ends a turn with a token the student never stops on."""
        return not self.chunked and self.own_template and self.end_id not in self.stop_ids.tolist()

    @property
    def swaps_end_of_turn(self) -> bool:
        """A token-for-token view that scores the teacher's own end-of-turn token in place of the student's."""
        return not self.chunked and self.own_template and any(int(stop) != self.end_id for stop in self.stop_ids)

    def needed(self, examples: list[Example]) -> bool:
        """Whether the teacher reads these rows otherwise than the student: without a view it scores the
        student's own batch."""
        return self.chunked or self.swaps_end_of_turn or self.changes_prompts(examples)

    def changes_prompts(self, examples: list[Example]) -> bool:
        return (
            self.chunked
            or self.own_template
            or self.settings.system_prompt != self.settings.student_system_prompt
            or any(example.fields.get(CONTEXT_FIELD) is not None for example in examples)
        )

    def teacher_prompt(self, example: Example) -> TeacherPrompt:
        return self.teacher_prompts([example])[0]

    def teacher_prompts(self, examples: list[Example]) -> list[TeacherPrompt]:
        """Each row's prompt for the teacher: its text and ids, and the anchor its completion is encoded
        after (its last plain tokens: no BOS a plain tokenizer adds). Cached per row; new rows are
        encoded together, two tokenizer calls for a step."""
        new = {id(example): example for example in examples if id(example) not in self._prompts}
        rendered = {key: self._render(example) for key, example in new.items()}
        tokenizer = self.teacher_tokenizer
        for add_special in {flag for _, flag in rendered.values()}:
            keys = [key for key, (_, flag) in rendered.items() if flag == add_special]
            texts = [rendered[key][0] for key in keys]
            plain = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            ids = tokenizer(texts, add_special_tokens=True)["input_ids"] if add_special else plain["input_ids"]
            for index, key in enumerate(keys):
                plain_ids, offsets = plain["input_ids"][index], plain["offset_mapping"][index]
                start = offsets[-ANCHOR_TOKENS][0] if len(plain_ids) >= ANCHOR_TOKENS else 0
                anchor = plain_ids[-ANCHOR_TOKENS:] if start else plain_ids
                # The row is kept with its prompt, so its id is not reused while cached.
                separators = self.separators if not add_special else ("", "")  # template rows only
                self._prompts[key] = (
                    TeacherPrompt(texts[index], ids[index], texts[index][start:], anchor, *separators),
                    new[key],
                )
        return [self._prompts[id(example)][0] for example in examples]

    def _render(self, example: Example) -> tuple[str, bool]:
        settings = self.settings
        try:
            return render_prompt(
                example,
                self.renderer,
                settings.system_prompt,
                settings.template_kwargs,
                example.fields.get(CONTEXT_FIELD),
                settings.context_format,
            )
        except DataError as exc:
            where = f"{example.file}:{example.line}" if example.file else f"line {example.line}"
            raise DataError(
                f"{where}: the teacher's prompt: {str(exc).removeprefix(f'line {example.line}: ')}"
            ) from None

    def teacher_batch(self, batch: StepBatch) -> tuple[StepBatch, ChunkAlignment | None]:
        """The batch the teacher scores, and with another tokenizer the alignment of its tokens."""
        if not self.chunked:
            return self._token_batch(batch), None
        return self._chunk_batch(batch)

    def _prompt_columns(self, prompts: list[TeacherPrompt], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return left_pad([prompt.ids for prompt in prompts], self.teacher_tokenizer.pad_token_id, device)  # (B, P') each

    def _token_batch(self, batch: StepBatch) -> StepBatch:
        """Same vocabulary: the student's completion ids as they are, after the teacher's own prompt."""
        changes = {}
        if self.changes_prompts(batch.rows):
            changes["prompt_ids"], changes["prompt_mask"] = self._prompt_columns(
                self.teacher_prompts(batch.rows), batch.prompt_ids.device
            )
        if self.swaps_end_of_turn:
            ids, mask = batch.completion_ids, batch.completion_mask
            last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & mask.bool()  # (B, T) each row's last token
            at_stop = last & torch.isin(ids, self.stop_ids.to(ids.device))
            changes["completion_ids"] = torch.where(at_stop, torch.full_like(ids, self.end_id), ids)
        return batch.replace(**changes) if changes else batch

    def _chunk_batch(self, batch: StepBatch) -> tuple[StepBatch, ChunkAlignment]:
        """Another tokenizer: the completion's bytes encoded by the teacher after its prompt, aligned in chunks."""
        prompts = self.teacher_prompts(batch.rows)
        teacher = self.cross.completions(batch.completion_ids, batch.completion_mask, batch.finished, prompts)
        device = batch.completion_ids.device
        completion_ids, completion_mask = right_pad(teacher.rows, self.teacher_tokenizer.pad_token_id, device)
        prompt_ids, prompt_mask = self._prompt_columns(prompts, device)
        teacher_batch = StepBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            sampler_logprobs=torch.zeros(completion_ids.shape, device=device),
            finished=torch.tensor(teacher.ended, device=device),
            prompt_index=batch.prompt_index,
            row_index=batch.row_index,
            rows=batch.rows,
            source=batch.source,
        )
        return teacher_batch, teacher.alignment


class ViewedTeacher:
    """A TokenScorer that scores the teacher's view of each row with the scorer behind it.

    local_model: the model behind a local scorer, whose context window the teacher's (longer) rows must
    fit; None for a server, which checks its own."""

    def __init__(self, scorer: TokenScorer, view: TeacherView, local_model: torch.nn.Module | None = None):
        self.scorer, self.view, self.local_model = scorer, view, local_model
        self.name = scorer.name

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The scorer's logits of its hidden states (a FullDistributionTeacher's; one vocabulary)."""
        return self.scorer.logits(hidden)

    @property
    def hidden_size(self) -> int:
        return self.scorer.hidden_size

    def score(self, batch: StepBatch, keep_hidden: bool = False) -> TeacherScores:
        teacher_batch, alignment = self.view.teacher_batch(batch)
        lengths = teacher_batch.prompt_mask.sum(1) + teacher_batch.completion_mask.sum(1)
        if self.local_model is not None:
            check_context(
                self.local_model,
                int(lengths.max()),
                "its own view of a row (its template, privileged context or tokenizer make rows longer)",
                f"teacher {self.name}",
                ModelError,
            )
        scores = self.scorer.score(teacher_batch, keep_hidden=keep_hidden)
        if alignment is None:
            return scores
        return TeacherScores(
            logprobs=alignment.fold(scores.logprobs), chunk_index=alignment.student_chunk, flops=scores.flops
        )
