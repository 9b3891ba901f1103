"""The teacher's own view and the chunk estimator, against brute-force byte accounting, with tokenizers
of different families built locally (tests/text_tokenizers.py)."""

from __future__ import annotations

import random

import pytest
import torch

from opd.data.rows import Example
from opd.demo.tokenizer import build_tokenizer
from opd.errors import DataError
from opd.objectives.losses import chunk_advantages, discounted_advantages
from opd.ops.batch import StepBatch, left_pad, right_pad
from opd.teachers.alignment import TRUNCATED, UNREPRESENTABLE
from opd.teachers.token_bytes import TokenBytes
from opd.teachers.view import TeacherView, ViewSettings, end_of_turn_id, reply_separator

from text_tokenizers import byte_level_bpe, random_text, sentencepiece_unigram, word_level_with_unknowns

CPU = torch.device("cpu")


def chat_row(content: str, line: int = 1, **fields) -> Example:
    messages = [{"role": "user", "content": content}]
    return Example(prompt=None, messages=messages, answer=None, line=line, fields={"messages": messages, **fields})


def student_batch(tokenizer, rows: list[Example], completions: list[list[int]], finished: list[bool]) -> StepBatch:
    """The student's batch: its own template's prompts, the given completion ids, random ℓˢ."""
    prompts = [
        tokenizer(row.prompt)["input_ids"]
        if row.messages is None
        else tokenizer.apply_chat_template(row.messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        for row in rows
    ]
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id, CPU)
    completion_ids, completion_mask = right_pad(completions, tokenizer.pad_token_id, CPU)
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(completion_ids.shape, generator=generator) * completion_mask
    index = torch.arange(len(rows))
    return StepBatch(
        prompt_ids, prompt_mask, completion_ids, completion_mask, logprobs, torch.tensor(finished), index, index, rows
    )


def sampled(tokenizer, texts: list[str], finished: list[bool]) -> list[list[int]]:
    stop = end_of_turn_id(tokenizer)
    return [
        tokenizer(text, add_special_tokens=False)["input_ids"] + ([stop] if done else [])
        for text, done in zip(texts, finished)
    ]


def chunk_bytes(table: TokenBytes, ids: torch.Tensor, chunks: torch.Tensor, chunk: int) -> bytes:
    return table.bytes_of(ids[chunks == chunk])


PAIRS = [(byte_level_bpe, sentencepiece_unigram), (sentencepiece_unigram, byte_level_bpe)]


@pytest.mark.parametrize("student_of, teacher_of", PAIRS, ids=["bpe->sentencepiece", "sentencepiece->bpe"])
def test_chunks_cover_the_same_bytes_and_telescope_to_the_sequence_log_ratio(student_of, teacher_of):
    student, teacher = student_of(), teacher_of()
    rng = random.Random(0)
    rows = [chat_row("say " + random_text(rng, 3), line) for line in range(1, 25)]
    texts = [rng.choice(["", " ", "\n"]) + random_text(rng, rng.randint(1, 12)) for _ in rows]
    finished = [True] * len(rows)
    batch = student_batch(student, rows, sampled(student, texts, finished), finished)
    view = TeacherView(student, teacher, [end_of_turn_id(student)], ViewSettings(chat_template="own"))
    teacher_batch, alignment = view.teacher_batch(batch)
    student_table, teacher_table = TokenBytes.of(student), TokenBytes.of(teacher)
    separators = (reply_separator(student), reply_separator(teacher))
    assert set(separators) == {" ", ""}  # Llama 2 writes a space after [/INST], ChatML none after its newline
    teacher_logprobs = (
        -torch.rand(teacher_batch.completion_ids.shape, dtype=torch.float64) * teacher_batch.completion_mask
    )
    folded = alignment.fold(teacher_logprobs)
    for row in range(len(rows)):
        length = int(batch.completion_mask[row].sum())
        student_ids, student_chunks = batch.completion_ids[row, :length], alignment.student_chunk[row, :length]
        teacher_length = int(teacher_batch.completion_mask[row].sum())
        teacher_ids, teacher_chunks = (
            teacher_batch.completion_ids[row, :teacher_length],
            alignment.teacher_chunk[row, :teacher_length],
        )
        assert bool((student_chunks >= 0).all()) and bool((teacher_chunks >= 0).all()), row  # nothing dropped
        last = int(student_chunks.max())
        assert int(teacher_chunks.max()) == last
        for chunk in range(last):  # every chunk but the end of turn: the same bytes on both sides
            student_bytes = chunk_bytes(student_table, student_ids, student_chunks, chunk)
            teacher_bytes = chunk_bytes(teacher_table, teacher_ids, teacher_chunks, chunk)
            if chunk == 0 and student_bytes.startswith(separators[0].encode()):  # each template's own reply separator
                student_bytes, teacher_bytes = student_bytes[len(separators[0]) :], teacher_bytes[len(separators[1]) :]
            assert student_bytes == teacher_bytes
        assert student_ids[-1] == end_of_turn_id(student) and teacher_ids[-1] == end_of_turn_id(teacher)
        assert (student_chunks == last).sum() == 1 and (teacher_chunks == last).sum() == 1  # the turn's end alone
        # The sampled text (a SentencePiece student's lone encoding carries its dummy-prefix space).
        assert student_table.bytes_of(student_ids[:-1]).decode().strip() == texts[row].strip()
        # Telescoping: the chunks' Σ ℓᵀ add up to the row's Σ ℓᵀ exactly.
        assert float(folded[row].sum()) == pytest.approx(float(teacher_logprobs[row].sum()), abs=1e-12)


def test_teacher_tokens_are_its_own_template_rendering_plus_the_completion():
    """chat_template: own, for two template families: the teacher's sequence is exactly its tokenizer's
    apply_chat_template rendering, then its encoding of the completion text, then its end-of-turn token."""
    for student, teacher in ((byte_level_bpe(), sentencepiece_unigram()), (sentencepiece_unigram(), byte_level_bpe())):
        row = chat_row("hello world")
        text = " the answer is 12"
        batch = student_batch(student, [row], sampled(student, [text], [True]), [True])
        teacher_batch, _ = TeacherView(
            student, teacher, [end_of_turn_id(student)], ViewSettings(chat_template="own")
        ).teacher_batch(batch)
        rendering = teacher.apply_chat_template(
            row.messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert teacher_batch.prompt_ids[0][teacher_batch.prompt_mask[0].bool()].tolist() == list(rendering)
        rendered = teacher.apply_chat_template(row.messages, add_generation_prompt=True, tokenize=False)
        prompt_alone = teacher(rendered, add_special_tokens=False)["input_ids"]
        text = TokenBytes.of(student).bytes_of(batch.completion_ids[0, :-1]).decode()  # what the student sampled
        if text.startswith(reply_separator(student)):  # its template's reply separator becomes the teacher's
            text = reply_separator(teacher) + text[len(reply_separator(student)) :]
        expected = teacher(rendered + text, add_special_tokens=False)["input_ids"][len(prompt_alone) :]
        completion = teacher_batch.completion_ids[0][teacher_batch.completion_mask[0].bool()].tolist()
        assert completion == expected + [end_of_turn_id(teacher)]
        assert TokenBytes.of(teacher).bytes_of(torch.tensor(completion[:-1])).decode() == text


def test_bos_on_one_side_only_and_the_dummy_prefix_space():
    """A plain prompt: the SentencePiece teacher adds BOS and a dummy-prefix space to the start of its
    prompt, never inside the completion; the byte-level student adds neither."""
    student, teacher = byte_level_bpe(), sentencepiece_unigram()
    row = Example(prompt="Question: hello?", messages=None, answer=None, line=1, fields={})
    completion = student(" hello world", add_special_tokens=False)["input_ids"]
    batch = student_batch(student, [chat_row("x")], [completion], [False]).replace(rows=[row])
    teacher_batch, alignment = TeacherView(student, teacher, [student.eos_token_id], ViewSettings()).teacher_batch(
        batch
    )
    prompt = teacher_batch.prompt_ids[0][teacher_batch.prompt_mask[0].bool()].tolist()
    assert prompt[0] == teacher.bos_token_id and prompt.count(teacher.bos_token_id) == 1
    tokens = teacher.convert_ids_to_tokens(teacher_batch.completion_ids[0][teacher_batch.completion_mask[0].bool()])
    assert tokens == ["▁hello", "▁world"]  # no doubled space at the seam, no BOS
    # A cut completion: the last chunk (" world": 2 student tokens, 1 teacher token) is dropped.
    assert alignment.student_chunk[0, : len(completion)].tolist()[-2:] == [TRUNCATED, TRUNCATED]


def test_a_completion_cut_mid_character_drops_the_partial_bytes_as_truncated():
    student, teacher = byte_level_bpe(), sentencepiece_unigram()
    ids = student(" hello 😀", add_special_tokens=False)["input_ids"]
    table = TokenBytes.of(student)
    pieces = [table.pieces[i] for i in ids]
    assert any(len(piece) < 4 and piece and piece[0] >= 0xF0 for piece in pieces), pieces  # the emoji is split
    cut = next(index for index, piece in enumerate(pieces) if piece and piece[0] >= 0xF0) + 1  # mid-character
    batch = student_batch(student, [chat_row("x")], [ids[:cut]], [False])
    _, alignment = TeacherView(student, teacher, [student.eos_token_id], ViewSettings()).teacher_batch(batch)
    codes = alignment.student_chunk[0, :cut].tolist()
    assert codes[-1] == TRUNCATED and all(code >= 0 for code in codes[:-3])


def test_bytes_the_teacher_cannot_encode_are_counted_and_left_out():
    student, teacher = byte_level_bpe(), word_level_with_unknowns()
    text = " hello Mia has the 東京 world"
    batch = student_batch(student, [chat_row("x")], sampled(student, [text], [True]), [True])
    teacher_batch, alignment = TeacherView(student, teacher, [end_of_turn_id(student)], ViewSettings()).teacher_batch(
        batch
    )
    codes = alignment.student_chunk[0, : int(batch.completion_mask[0].sum())]
    table = TokenBytes.of(student)
    dropped = table.bytes_of(batch.completion_ids[0, : len(codes)][codes == UNREPRESENTABLE]).decode()
    assert dropped.split() == ["Mia", "東京"]  # what the teacher's vocabulary lacks, nothing else
    kept_teacher = teacher_batch.completion_ids[0][alignment.teacher_chunk[0] >= 0]
    assert teacher.unk_token_id not in kept_teacher.tolist()
    folded = alignment.fold(-torch.ones(teacher_batch.completion_ids.shape))
    assert float(folded.sum()) == -float((alignment.teacher_chunk[0] >= 0).sum())


def test_bytes_that_are_not_utf8_are_unrepresentable():
    student, teacher = byte_level_bpe(), sentencepiece_unigram()
    table = TokenBytes.of(student)
    lone = next(index for index, piece in enumerate(table.pieces) if piece == bytes([0xA7]))  # a continuation byte
    readable = student(" hello world the", add_special_tokens=False)["input_ids"]
    ids = readable + [lone] + student(" world", add_special_tokens=False)["input_ids"]
    batch = student_batch(student, [chat_row("x")], [ids + [end_of_turn_id(student)]], [True])
    _, alignment = TeacherView(student, teacher, [end_of_turn_id(student)], ViewSettings()).teacher_batch(batch)
    codes = alignment.student_chunk[0, : len(ids) + 1].tolist()
    assert min(codes[:3]) >= 0  # " hello world" is read and scored
    assert codes[len(readable) - 1] == TRUNCATED  # the text stops after " the": its chunk is cut
    assert all(code == UNREPRESENTABLE for code in codes[len(readable) :])  # the rest can't be read as text


def test_one_tokenizer_through_the_chunk_path_is_the_token_path():
    """Identity: the demo's word-level tokenizer on both sides, alignment forced to chunks: one chunk per
    token, the teacher's sequence the student's, and the advantages of the direct path exactly."""
    tokenizer = build_tokenizer()
    rng = random.Random(3)
    words = [word for word in tokenizer.get_vocab() if word not in ("<unk>", "<|endoftext|>")]
    rows = [
        Example(prompt="Question : how many ? \n Answer :", messages=None, answer=None, line=i + 1, fields={})
        for i in range(6)
    ]
    completions = [tokenizer(" ".join(rng.choice(words) for _ in range(rng.randint(1, 9))))["input_ids"] for _ in rows]
    finished = [i % 2 == 0 for i in range(len(rows))]
    completions = [ids + [tokenizer.eos_token_id] if done else ids for ids, done in zip(completions, finished)]
    batch = student_batch(tokenizer, rows, completions, finished)
    view = TeacherView(tokenizer, tokenizer, [tokenizer.eos_token_id], ViewSettings(alignment="chunks"))
    teacher_batch, alignment = view.teacher_batch(batch)
    assert torch.equal(
        teacher_batch.completion_ids * teacher_batch.completion_mask,
        (batch.completion_ids * batch.completion_mask)[:, : teacher_batch.completion_ids.shape[1]],
    )
    assert torch.equal(teacher_batch.prompt_ids, batch.prompt_ids)
    mask = batch.completion_mask.bool()
    expected_chunks = torch.arange(mask.shape[1]).expand_as(mask)
    assert torch.equal(alignment.student_chunk[mask], expected_chunks[mask])
    teacher_logprobs = -torch.rand(batch.completion_ids.shape) * batch.completion_mask
    folded = alignment.fold(teacher_logprobs[:, : teacher_batch.completion_ids.shape[1]])
    assert torch.equal(folded, teacher_logprobs)
    for discount in (0.0, 0.9):
        direct = discounted_advantages(batch.sampler_logprobs, teacher_logprobs, batch.completion_mask, 1.5, discount)
        chunked = chunk_advantages(
            batch.sampler_logprobs, folded, alignment.student_chunk, batch.completion_mask, 1.5, discount
        )
        assert torch.equal(direct, chunked)


def test_chunk_advantages_give_each_token_its_chunk_delta():
    """Brute force: A of every token of chunk C is -c * Σ_{C' >= C} γ^(C'-C) Δ_C', dropped tokens 0."""
    student = torch.tensor([[-1.0, -2.0, -0.5, -0.25, -3.0, 0.0]])
    teacher = torch.tensor([[0.0, -4.0, 0.0, -1.0, -2.0, 0.0]])  # each chunk's Σ ℓᵀ at its last token
    chunks = torch.tensor([[0, 0, 1, 1, UNREPRESENTABLE, TRUNCATED]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    deltas = [(-1.0 - 2.0) - (-4.0), (-0.5 - 0.25) - (-1.0)]
    for discount in (0.0, 0.5):
        advantages = chunk_advantages(student, teacher, chunks, mask, coef=2.0, discount=discount)
        first = -2.0 * (deltas[0] + discount**1 * deltas[1])
        second = -2.0 * deltas[1]
        assert advantages.tolist() == [[pytest.approx(first)] * 2 + [pytest.approx(second)] * 2 + [0.0, 0.0]]


def test_privileged_context_reaches_the_teacher_and_never_the_student(tmp_path):
    from opd.data.prompts import load_prompts

    tokenizer = byte_level_bpe()
    data = tmp_path / "rows.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "hello world"}], "teacher_context": "the answer is 127"}\n'
        '{"prompt": "price:", "teacher_context": "€5"}\n'
    )
    prompts = load_prompts(str(data), "data.train", tokenizer, 512, "be brief")
    student_texts = [tokenizer.decode(ids) for ids in prompts.token_ids]
    assert all("127" not in text and "€5" not in text for text in student_texts)
    view = TeacherView(
        tokenizer,
        tokenizer,
        [end_of_turn_id(tokenizer)],
        ViewSettings(system_prompt="you see the answer", context_format="{prompt}\nHint: {context}"),
    )
    chat, plain = (tokenizer.decode(view.teacher_prompt(example).ids) for example in prompts.examples)
    assert chat == (
        "<|im_start|>system\nyou see the answer<|im_end|>\n<|im_start|>user\nhello world\nHint: the answer "
        "is 127<|im_end|>\n<|im_start|>assistant\n"
    )
    assert plain == "price:\nHint: €5"
    assert "be brief" in student_texts[0] and "you see the answer" not in student_texts[0]


def test_a_template_that_cannot_render_a_row_names_the_file_and_line(tmp_path):
    from opd.data.rows import read_jsonl

    data = tmp_path / "rows.jsonl"
    data.write_text(
        '{"prompt": "a"}\n{"messages": [{"role": "assistant", "content": "no user turn"}], "teacher_context": "x"}\n'
    )
    rows = read_jsonl(data, "data.train")
    view = TeacherView(byte_level_bpe(), sentencepiece_unigram(), [0], ViewSettings(chat_template="own"))
    with pytest.raises(DataError, match=rf"{data}:2: the teacher's prompt"):
        view.teacher_prompt(rows[1])


def test_same_vocabulary_own_template_scores_the_teachers_end_of_turn_in_place():
    """Token-for-token view: the student's ids unchanged but its stop token, which becomes the teacher's."""
    student = byte_level_bpe()
    teacher = byte_level_bpe()  # one vocabulary, but the teacher's template ends turns differently
    view = TeacherView(
        student, teacher, [student.eos_token_id, student.pad_token_id], ViewSettings(chat_template="own")
    )
    assert not view.chunked
    ids = student(" hello", add_special_tokens=False)["input_ids"]
    batch = student_batch(student, [chat_row("x")], [ids + [student.pad_token_id]], [True])
    teacher_batch, alignment = view.teacher_batch(batch)
    assert alignment is None and view.end_id == end_of_turn_id(teacher)
    assert teacher_batch.completion_ids[0].tolist() == ids + [view.end_id]


def test_each_templates_reply_separator_is_translated():
    """Llama 2 replies after "[/INST] ", ChatML after "assistant\n": the teacher reads the reply as its own
    template would write it, the separators counted in the first chunk."""
    llama, chatml = sentencepiece_unigram(), byte_level_bpe()
    for student, teacher, sampled_text, teacher_text in (
        (llama, chatml, "hello world", "hello world"),
        (chatml, llama, "hello world", " hello world"),
    ):
        ids = student(sampled_text, add_special_tokens=False)["input_ids"]  # Llama's dummy prefix: " hello world"
        batch = student_batch(student, [chat_row("x")], [ids + [end_of_turn_id(student)]], [True])
        teacher_batch, alignment = TeacherView(
            student, teacher, [end_of_turn_id(student)], ViewSettings(chat_template="own")
        ).teacher_batch(batch)
        completion = teacher_batch.completion_ids[0][teacher_batch.completion_mask[0].bool()][:-1]
        assert TokenBytes.of(teacher).bytes_of(completion).decode() == teacher_text
        assert (alignment.student_chunk[0, : len(ids) + 1] >= 0).all()


def test_text_the_teachers_normalizer_rewrites_is_unrepresentable_not_scored():
    """A lowercasing teacher keeps every byte length but not the bytes: its rows are left out, never scored."""
    from tokenizers import normalizers

    teacher = byte_level_bpe()
    lowercasing = type(teacher)(
        tokenizer_object=teacher.backend_tokenizer.__class__.from_str(teacher.backend_tokenizer.to_str()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    lowercasing.backend_tokenizer.normalizer = normalizers.Lowercase()
    student = sentencepiece_unigram()
    ids = student("HELLO World", add_special_tokens=False)["input_ids"]
    batch = student_batch(student, [chat_row("x")], [ids + [end_of_turn_id(student)]], [True])
    _, alignment = TeacherView(student, lowercasing, [end_of_turn_id(student)], ViewSettings()).teacher_batch(batch)
    assert (alignment.student_chunk[0, : len(ids) + 1] == UNREPRESENTABLE).all()
