"""The teacher's own view of a rollout: its own prompt, and its own tokens of the student's completion.

A teacher need not read a row the way the student does:
- `teacher.chat_template: own`: the row's messages rendered by the teacher's tokenizer and template,
  with its generation prompt; the student's end-of-turn token becomes the teacher's.
- Privileged context: `data.teacher_system_prompt` and a row's `teacher_context` field (say, the
  reference solution) reach the teacher's prompt only.
- Another tokenizer: the student's completion ids become their exact bytes (`opd.token_bytes`), the
  teacher encodes its prompt followed by that text in one call, so the seam is tokenized as its
  template would, and the chunk estimator (`opd.alignment`) maps its scores back onto the student's
  tokens. The student's ids are never re-encoded on the student's side.

`ViewedTeacher` puts a view in front of any TokenScorer (a local model, a server), which then scores
the teacher's sequences as it scores any batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from opd.alignment import TRUNCATED, UNREPRESENTABLE, ChunkAlignment, align_chunks
from opd.batch import StepBatch, left_pad, right_pad
from opd.data import Example, render_prompt
from opd.errors import DataError
from opd.teacher import TeacherScores, TokenScorer
from opd.token_bytes import TokenBytes, utf8_lengths, valid_utf8_prefix

CONTEXT_FIELD = "teacher_context"


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


def end_of_turn_id(tokenizer, template_kwargs: dict | None = None) -> int:
    """The token that ends an assistant turn in the tokenizer's chat template (`<|im_end|>`,
    `<|eot_id|>`, ...), read from a rendered turn; the EOS token without a template."""
    if getattr(tokenizer, "chat_template", None):
        marker = "opd-end-of-turn-marker"
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                                 tokenize=False, **(template_kwargs or {}))
        except Exception:  # a template that can't render a plain exchange: fall back to EOS
            text = ""
        if marker in text:
            after = tokenizer(text[text.rindex(marker) + len(marker):], add_special_tokens=False)["input_ids"]
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
            raise ValueError("the teacher's tokenizer differs from the student's, so its tokens can't be matched one "
                             "for one (alignment: tokens); use alignment auto or chunks")
        self.chunked = settings.alignment == "chunks" or not same_vocabulary
        self.own_template = settings.chat_template == "own"
        self.stop_ids = torch.tensor(sorted(student_stop_ids))
        self.end_id = (end_of_turn_id(teacher_tokenizer, settings.template_kwargs) if self.own_template
                       else teacher_tokenizer.eos_token_id)
        self.renderer = teacher_tokenizer if self.own_template else student_tokenizer
        if self.chunked:
            self.student_bytes, self.teacher_bytes = TokenBytes.of(student_tokenizer), TokenBytes.of(teacher_tokenizer)
        self._prompts: dict[int, tuple] = {}

    @property
    def swaps_end_of_turn(self) -> bool:
        """A token-for-token view that scores the teacher's own end-of-turn token in place of the student's."""
        return not self.chunked and self.own_template and any(int(stop) != self.end_id for stop in self.stop_ids)

    def changes_prompts(self, examples: list[Example]) -> bool:
        return (self.chunked or self.own_template or self.settings.system_prompt != self.settings.student_system_prompt
                or any(example.fields.get(CONTEXT_FIELD) is not None for example in examples))

    def teacher_prompt(self, example: Example) -> tuple[str, list[int], list[int]]:
        """The row's prompt for the teacher: its text, its token ids, and its ids without the special tokens
        a plain tokenizer adds (BOS), which start the prompt-and-completion encoding. Cached per row."""
        key = id(example)
        if key not in self._prompts:
            settings = self.settings
            try:
                text, add_special = render_prompt(example, self.renderer, settings.system_prompt,
                                                  settings.template_kwargs, example.fields.get(CONTEXT_FIELD),
                                                  settings.context_format)
            except DataError as exc:
                where = f"{example.source}:{example.line}" if example.source else f"line {example.line}"
                raise DataError(f"{where}: the teacher's prompt: {str(exc).removeprefix(f'line {example.line}: ')}") from None
            ids = self.teacher_tokenizer(text, add_special_tokens=add_special)["input_ids"]
            plain = self.teacher_tokenizer(text, add_special_tokens=False)["input_ids"] if add_special else ids
            self._prompts[key] = (text, ids, plain, example)  # the row is kept alive with its id
        return self._prompts[key][:3]

    def teacher_batch(self, batch: StepBatch) -> tuple[StepBatch, ChunkAlignment | None]:
        """The batch the teacher scores, and with another tokenizer the alignment of its tokens."""
        if not self.chunked:
            return self._token_batch(batch), None
        return self._chunk_batch(batch)

    def _prompt_columns(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [self.teacher_prompt(example)[1] for example in batch.rows]
        return left_pad(ids, self.teacher_tokenizer.pad_token_id, batch.prompt_ids.device)  # (B, P') each

    def _token_batch(self, batch: StepBatch) -> StepBatch:
        """Same vocabulary: the student's completion ids as they are, after the teacher's own prompt."""
        changes = {}
        if self.changes_prompts(batch.rows):
            changes["prompt_ids"], changes["prompt_mask"] = self._prompt_columns(batch)
        if self.swaps_end_of_turn:
            ids, mask = batch.completion_ids, batch.completion_mask
            last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & mask.bool()  # (B, T) each row's last token
            at_stop = last & torch.isin(ids, self.stop_ids.to(ids.device))
            changes["completion_ids"] = torch.where(at_stop, torch.full_like(ids, self.end_id), ids)
        return batch.replace(**changes) if changes else batch

    def _chunk_batch(self, batch: StepBatch) -> tuple[StepBatch, ChunkAlignment]:
        """Another tokenizer: the completion's bytes encoded by the teacher after its prompt, aligned in chunks."""
        rows = len(batch)
        lengths = batch.completion_mask.sum(1).tolist()
        completions = [ids[:length] for ids, length in zip(batch.completion_ids.cpu(), lengths)]
        ended = [bool(length) and bool(batch.finished[row]) and bool(torch.isin(ids[-1:], self.stop_ids).all())
                 for row, (ids, length) in enumerate(zip(completions, lengths))]
        texts, student_lengths, codes = [], [], []
        for ids, end in zip(completions, ended):
            text_ids = ids[:-1] if end else ids
            token_lengths = self.student_bytes.lengths[text_ids]  # (n,)
            data = self.student_bytes.bytes_of(text_ids)
            usable, tail_code = _usable_bytes(data, torch.cumsum(token_lengths, 0), end)
            texts.append(data[:usable].decode("utf-8"))
            keep = int((torch.cumsum(token_lengths, 0) <= usable).sum())
            code = torch.full((len(ids),), tail_code, dtype=torch.long)  # tokens past the usable bytes
            student_lengths.append(token_lengths[:keep])
            codes.append(code)
            ended[len(texts) - 1] = end and usable == len(data)  # the end-of-turn chunk needs all the text
        teacher_ids, teacher_lengths, unknown = self._encode_completions(batch.rows, texts)
        aligned = [i for i in range(rows) if teacher_lengths[i] is not None]
        pairs = align_chunks(
            [torch.cat([student_lengths[i], torch.ones(1, dtype=torch.long)]) if ended[i] else student_lengths[i]
             for i in aligned],
            [torch.cat([teacher_lengths[i], torch.ones(1, dtype=torch.long)]) if ended[i] else teacher_lengths[i]
             for i in aligned])
        teacher_rows, teacher_codes = [], []
        for i in range(rows):
            teacher_rows.append(teacher_ids[i] + [self.end_id] if ended[i] or teacher_lengths[i] is None
                                or not teacher_ids[i] else teacher_ids[i])
            teacher_codes.append(torch.full((len(teacher_rows[i]),), -1, dtype=torch.long))
        for i, (student_chunk, teacher_chunk) in zip(aligned, pairs):
            kept = len(student_chunk)
            codes[i][:kept] = student_chunk
            teacher_codes[i][: len(teacher_chunk)] = teacher_chunk
            _drop_chunks(codes[i][:kept], teacher_codes[i][: len(teacher_chunk)],
                         unknown[i], trailing=not ended[i] and kept > 0)
        for i in set(range(rows)) - set(aligned):
            codes[i][:] = UNREPRESENTABLE
        device = batch.completion_ids.device
        completion_ids, completion_mask = right_pad(teacher_rows, self.teacher_tokenizer.pad_token_id, device)
        prompt_ids, prompt_mask = self._prompt_columns(batch)
        width = batch.completion_ids.shape[1]
        student_chunk = torch.full((rows, width), TRUNCATED, dtype=torch.long)
        for i, code in enumerate(codes):
            student_chunk[i, : len(code)] = code
        teacher_chunk = torch.full(completion_ids.shape, -1, dtype=torch.long)
        for i, code in enumerate(teacher_codes):
            teacher_chunk[i, : len(code)] = code
        teacher_batch = StepBatch(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
            completion_mask=completion_mask, sampler_logprobs=torch.zeros(completion_ids.shape, device=device),
            finished=torch.tensor(ended, device=device), prompt_index=batch.prompt_index, row_index=batch.row_index,
            rows=batch.rows, source=batch.source)
        return teacher_batch, ChunkAlignment(student_chunk.to(device), teacher_chunk.to(device))

    def _encode_completions(self, rows: list[Example], texts: list[str]):
        """Each completion text encoded by the teacher after its prompt, in one tokenizer call. Returns per
        row the teacher's completion ids, their byte lengths (None where the encoding does not give back
        the text's bytes), and which of them are unknown tokens."""
        tokenizer, table = self.teacher_tokenizer, self.teacher_bytes
        prompts = [self.teacher_prompt(example) for example in rows]
        joined = [prompt_text + text for (prompt_text, _, _), text in zip(prompts, texts)]
        encoded = tokenizer(joined, add_special_tokens=False, return_offsets_mapping=True)
        ids_out, lengths_out, unknown_out = [], [], []
        for i, (text, (_, _, prompt_ids)) in enumerate(zip(texts, prompts)):
            ids, offsets = encoded["input_ids"][i], encoded["offset_mapping"][i]
            if ids[: len(prompt_ids)] == prompt_ids:  # the seam: the prompt's tokens unchanged
                ids, offsets, base = ids[len(prompt_ids):], offsets[len(prompt_ids):], len(joined[i]) - len(text)
            else:  # the text merged with the prompt's last token: encode it on its own
                alone = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                ids, offsets, base = alone["input_ids"], alone["offset_mapping"], 0
            ids_tensor = torch.tensor(ids, dtype=torch.long)
            token_lengths = table.lengths[ids_tensor] if ids else torch.zeros(0, dtype=torch.long)
            unknown = (ids_tensor == table.unk_id) if table.unk_id is not None else torch.zeros(len(ids), dtype=torch.bool)
            if bool(unknown.any()):  # an unknown token stands for the text since the previous token's end
                source = joined[i] if base else text
                byte_at = np.concatenate([[0], np.cumsum(utf8_lengths(source))]) - len(source[:base].encode())
                for position in unknown.nonzero().flatten().tolist():
                    start, end = offsets[position]
                    token_lengths[position] = int(byte_at[end]) - int(token_lengths[:position].sum())
                    unknown[position] = source[start:end] != tokenizer.unk_token  # the literal is no failure
            matches = int(token_lengths.sum()) == len(text.encode("utf-8"))
            ids_out.append(ids)
            lengths_out.append(token_lengths if matches else None)
            unknown_out.append(unknown)
        return ids_out, lengths_out, unknown_out


def _usable_bytes(data: bytes, token_ends: torch.Tensor, ended: bool) -> tuple[int, int]:
    """How many of a completion's bytes the teacher can read (whole UTF-8 characters, ending at a
    student token boundary), and the code of the student tokens past them: TRUNCATED where the bytes
    stop mid-character at the end of a cut completion, UNREPRESENTABLE where they are not text."""
    usable = len(data)
    while True:
        prefix = valid_utf8_prefix(data[:usable])
        at_boundary = int(token_ends[token_ends <= prefix].max()) if bool((token_ends <= prefix).any()) else 0
        if at_boundary == usable:
            break
        usable = at_boundary
    if usable == len(data):
        return usable, TRUNCATED
    try:  # only an incomplete last character (a cut completion) is truncation
        data[valid_utf8_prefix(data):].decode("utf-8")
        cut_character = False
    except UnicodeDecodeError as exc:
        cut_character = exc.reason == "unexpected end of data" and not ended
    return usable, TRUNCATED if cut_character else UNREPRESENTABLE


def _drop_chunks(student_chunk: torch.Tensor, teacher_chunk: torch.Tensor, unknown: torch.Tensor,
                 trailing: bool) -> None:
    """In place: chunks holding a teacher unknown token become UNREPRESENTABLE; a cut completion's last
    chunk becomes TRUNCATED unless it is one token on each side (see opd.alignment)."""
    if bool(unknown.any()):
        bad = torch.unique(teacher_chunk[: len(unknown)][unknown])
        teacher_chunk[torch.isin(teacher_chunk, bad)] = -1
        student_chunk[torch.isin(student_chunk, bad)] = UNREPRESENTABLE
    if trailing:
        last = int(student_chunk.max()) if bool((student_chunk >= 0).any()) else -1
        if last >= 0 and not (int((student_chunk == last).sum()) == 1 and int((teacher_chunk == last).sum()) == 1):
            student_chunk[student_chunk == last] = TRUNCATED
            teacher_chunk[teacher_chunk == last] = -1


class ViewedTeacher:
    """A TokenScorer that scores the teacher's view of each row with the scorer behind it."""

    def __init__(self, scorer: TokenScorer, view: TeacherView):
        self.scorer, self.view = scorer, view
        self.name = scorer.name

    def __getattr__(self, name):  # the model, its loaded form, logits(): the scorer's own
        return getattr(self.scorer, name)

    def score(self, batch: StepBatch, keep_hidden: bool = False) -> TeacherScores:
        teacher_batch, alignment = self.view.teacher_batch(batch)
        scores = self.scorer.score(teacher_batch, keep_hidden=keep_hidden) if keep_hidden else self.scorer.score(teacher_batch)
        if alignment is None:
            return scores
        return TeacherScores(logprobs=alignment.fold(scores.logprobs), chunk_index=alignment.student_chunk)

    def scoring_flops(self, batch: StepBatch) -> float:
        return self.scorer.scoring_flops(self.view.teacher_batch(batch)[0])
