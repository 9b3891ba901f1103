"""The sampler, the teacher and the traps of DESIGN.md §3 that live between them."""

from __future__ import annotations

import math

import pytest
import torch

from opd.models.loading import load_model
from opd.models.precision import Precision
from opd.objectives import losses
from opd.objectives.kinds import Divergence, PolicyGradient
from opd.ops.batch import StepBatch
from opd.ops.forward import completion_hidden_states, logits_from_hidden
from opd.rollout.sampler import draw
from opd.teachers.local import LocalTeacher
from opd.train.metrics import masked_mean, rollout_metrics
from opd.train.update import backward_micro_batch

from conftest import CPU, model_sampler, prompt_batch, recompute_logprobs


def local_teacher(loaded, chunk_size: int = 1024) -> LocalTeacher:
    return LocalTeacher(loaded, 1.0, chunk_size, CPU)


def gradient_of(student, teacher, batch: StepBatch, objective, micro: int, chunk_size: int = 5):
    """Loss and flat gradient of one step's objective over micro-batches of `micro` rows."""
    student.model.zero_grad(set_to_none=True)
    batch = objective.prepare(batch)
    loss = sum(
        backward_micro_batch(
            student, teacher, batch.select(slice(row, row + micro)), objective, batch.num_tokens, chunk_size, CPU
        ).loss
        for row in range(0, len(batch), micro)
    )
    return loss, torch.cat([p.grad.flatten() for p in student.model.parameters() if p.grad is not None])


@pytest.fixture(scope="module")
def models(tiny_models):
    return {name: load_model(str(path), name, CPU.device) for name, path in tiny_models.items()}


def prompts(tokenizer):
    return [
        tokenizer("Question : Mia has 3 apples . \n Answer :")["input_ids"],
        tokenizer("Question : Tom ?")["input_ids"],
    ]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_sampler_logprobs_are_those_of_the_sampling_distribution(models, temperature, top_k, top_p):
    student = models["student"]
    sampler = model_sampler(student, 12, temperature=temperature, top_k=top_k, top_p=top_p)
    rollouts = sampler.sample(prompt_batch(prompts(student.tokenizer)), 3, 0)
    reference = recompute_logprobs(student, rollouts, temperature, top_k, top_p)
    torch.testing.assert_close(rollouts.sampler_logprobs, reference * rollouts.completion_mask, atol=2e-5, rtol=0)
    if temperature != 1.0:  # scoring at 1.0 instead would describe another distribution (ArcticTraining #344)
        at_one = recompute_logprobs(student, rollouts, 1.0)
        assert (rollouts.sampler_logprobs - at_one * rollouts.completion_mask).abs().max() > 1e-2


@pytest.mark.parametrize("vocab", [97, 300])
def test_draw_follows_the_softmax_and_returns_its_log_probabilities(vocab):
    """Frequencies of 40,000 draws per row against softmax(logits): spread-out rows, one with most mass
    in a single token, -inf entries (never drawn) and a row that only its last token can take."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, vocab, generator=generator) * 2
    logits[1, 5] = 9.0
    logits[2, 60:] = float("-inf")
    logits[3, :-1] = float("-inf")
    probs = torch.softmax(logits, -1)
    draws = 40_000  # per row
    counts = torch.zeros_like(probs)
    for _ in range(draws // 1000):
        tokens, logprobs, entropy = draw(logits.repeat_interleave(1000, 0), torch.rand(4000, generator=generator))
        rows = torch.arange(4).repeat_interleave(1000)
        counts.index_put_((rows, tokens), torch.ones(len(tokens)), accumulate=True)
        torch.testing.assert_close(logprobs, probs.log()[rows, tokens], atol=1e-5, rtol=1e-5)
    exact_entropy = -torch.where(probs > 0, probs * probs.log(), 0.0).sum(-1)  # (4,), 0 for the one-token row
    torch.testing.assert_close(entropy[::1000], exact_entropy, atol=1e-5, rtol=1e-5)
    assert counts[probs == 0].sum() == 0
    frequencies = counts / draws
    # Binomial standard error of each entry; 5 sigma plus a little for the smallest ones.
    tolerance = 5 * (probs * (1 - probs) / draws).sqrt() + 1e-5
    assert ((frequencies - probs).abs() <= tolerance).all()
    assert counts[3, -1] == draws


def test_a_draw_at_the_very_top_of_the_cdf_takes_the_last_token_with_mass():
    """A uniform number of 1 (which rounding can produce) lands past the CDF's end; the tokens at the end
    of the vocabulary have probability 0 here, so the draw must step back to the last one that doesn't."""
    logits = torch.zeros(2, 10)
    logits[0, 7:] = float("-inf")
    tokens, logprobs, _ = draw(logits, torch.ones(2, dtype=torch.float64))
    assert tokens.tolist() == [6, 9]
    torch.testing.assert_close(logprobs, torch.tensor([-math.log(7), -math.log(10)]))


def sample_with_early_eos(models):
    """Rollouts of which some stop early: a forward hook adds a constant to the EOS logit."""
    student = models["student"]
    eos = student.tokenizer.eos_token_id
    assert student.tokenizer.pad_token_id == eos
    head = student.model.get_output_embeddings()

    def favour_eos(module, inputs, output):
        output = output.clone()
        output[..., eos] += 3.5
        return output

    handle = head.register_forward_hook(favour_eos)
    try:
        return model_sampler(student, 12).sample(prompt_batch(prompts(student.tokenizer)), 8, 3)
    finally:
        handle.remove()


def test_eos_stays_in_the_mask_when_pad_is_eos_and_nothing_after_it(models):
    rollouts = sample_with_early_eos(models)
    eos = models["student"].tokenizer.eos_token_id
    early = [
        row
        for row in range(len(rollouts))
        if rollouts.finished[row] and rollouts.completion_mask[row].sum() < rollouts.completion_ids.shape[1]
    ]
    assert early, "test needs rollouts that stop before the last column"
    for row in early:
        eos_at = int((rollouts.completion_ids[row] == eos).nonzero()[0])
        assert rollouts.completion_mask[row, : eos_at + 1].all()  # EOS itself is trained on
        assert not rollouts.completion_mask[row, eos_at + 1 :].any()  # pad (== eos) after it is not
        assert rollouts.sampler_logprobs[row, eos_at] < 0
        assert (rollouts.sampler_logprobs[row, eos_at + 1 :] == 0).all()


def test_tokens_after_eos_change_neither_loss_nor_gradient_nor_metrics(models):
    student, teacher = models["student"], local_teacher(models["teacher"])
    rollouts = sample_with_early_eos(models)
    assert (rollouts.completion_mask == 0).any()
    garbage = rollouts.completion_ids.clone()
    garbage[rollouts.completion_mask == 0] = 17
    polluted = rollouts.replace(completion_ids=garbage)
    objective = PolicyGradient(1.0, 0, 1.0, None, kl_coef=1.0, discount=0.5)

    def step(batch):
        batch = teacher.score(batch).attach(batch)
        loss, grads = gradient_of(student, teacher, batch, objective, micro=len(batch))
        return loss, grads, rollout_metrics(batch)

    loss_a, grads_a, metrics_a = step(rollouts)
    loss_b, grads_b, metrics_b = step(polluted)
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    torch.testing.assert_close(grads_a, grads_b, atol=1e-6, rtol=1e-5)
    assert metrics_a == pytest.approx(metrics_b, abs=1e-6)
    assert metrics_a["generation/avg_length"] == pytest.approx(float(rollouts.completion_mask.sum(1).float().mean()))


def test_eos_token_receives_gradient(models):
    rollouts = sample_with_early_eos(models)
    student = models["student"]
    eos = student.tokenizer.eos_token_id
    row = int(next(r for r in range(len(rollouts)) if rollouts.finished[r]))
    eos_at = int((rollouts.completion_ids[row] == eos).nonzero()[0])
    advantages = torch.zeros_like(rollouts.sampler_logprobs)
    advantages[row, eos_at] = 1.0  # only the EOS position carries reward
    student.model.zero_grad(set_to_none=True)
    objective = PolicyGradient(1.0, 0, 1.0, None, kl_coef=1.0, discount=0.0)
    backward_micro_batch(
        student, None, rollouts.replace(advantages=advantages), objective, rollouts.num_tokens, 64, CPU
    )
    eos_row_grad = student.model.get_output_embeddings().weight.grad[eos]
    assert eos_row_grad.abs().sum() > 0


def test_left_padding_keeps_positions(models):
    """A prompt scored alone and scored beside a longer, left-padded prompt gives the same log-probs."""
    teacher = local_teacher(models["teacher"])
    student = models["student"]
    sampler = model_sampler(student, 6)
    short, long = prompts(student.tokenizer)[1], prompts(student.tokenizer)[0]
    assert len(long) > len(short)
    together = sampler.sample(prompt_batch([long, short]), 1, 0)
    alone = sampler.sample(prompt_batch([short]), 1, 0)
    # Same completion tokens for the short prompt, scored alone and padded:
    forced = alone.replace(
        completion_ids=together.completion_ids[1:],
        completion_mask=together.completion_mask[1:],
        sampler_logprobs=together.sampler_logprobs[1:],
        finished=together.finished[1:],
    )
    torch.testing.assert_close(
        teacher.score(together).logprobs[1], teacher.score(forced).logprobs[0], atol=1e-5, rtol=0
    )
    reference = recompute_logprobs(student, forced, 1.0)[0]
    torch.testing.assert_close(together.sampler_logprobs[1], reference * together.completion_mask[1], atol=2e-5, rtol=0)


def test_padding_rows_of_the_embedding_are_ignored(models):
    """Teacher with 7 extra embedding rows (Qwen: 151,936 rows, 151,669 tokens) scores over the tokenizer's vocab."""
    teacher = models["teacher"]
    assert teacher.model.config.vocab_size == len(teacher.tokenizer) + 7
    assert teacher.tokenizer.get_vocab() == models["student"].tokenizer.get_vocab()
    hidden = torch.randn(2, 3, teacher.model.config.hidden_size)
    assert logits_from_hidden(teacher.model, hidden, teacher.vocab_size).shape[-1] == len(teacher.tokenizer)
    # Even a hugely favoured padding row is never sampled.
    head = teacher.model.get_output_embeddings()
    with torch.no_grad():
        saved = head.weight[-1].clone()
        head.weight[-1] = 50 * head.weight.abs().max()
    try:
        rollouts = model_sampler(teacher, 6).sample(prompt_batch(prompts(teacher.tokenizer)), 4, 0)
    finally:
        with torch.no_grad():
            head.weight[-1] = saved
    assert int(rollouts.completion_ids.max()) < len(teacher.tokenizer)


def test_metrics_ignore_minus_inf_outside_the_mask():
    values = torch.tensor([[-1.0, -3.0, float("-inf")]])
    mask = torch.tensor([[1, 1, 0]])
    assert masked_mean(values, mask) == pytest.approx(-2.0)


def test_teacher_hidden_states_cover_only_completion(models):
    teacher = models["teacher"]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.ones_like(ids)
    hidden = completion_hidden_states(teacher.model, ids, mask, 2)
    with torch.no_grad():
        full = teacher.model(input_ids=ids).logits[:, 2:4, : teacher.vocab_size]
    torch.testing.assert_close(
        logits_from_hidden(teacher.model, hidden, teacher.vocab_size), full, atol=1e-5, rtol=1e-5
    )


def test_sampling_stops_at_every_stop_token_of_the_generation_config(models):
    """Llama 3 / Qwen chat models end turns with a token other than the tokenizer's EOS."""
    student = models["student"]
    stop = student.tokenizer.convert_tokens_to_ids(".")
    original = student.model.generation_config.eos_token_id
    student.model.generation_config.eos_token_id = [student.tokenizer.eos_token_id, stop]

    def favour_stop(module, inputs, output):
        output = output.clone()
        output[..., stop] += 4.0
        return output

    handle = student.model.get_output_embeddings().register_forward_hook(favour_stop)
    try:
        rollouts = model_sampler(student, 12).sample(prompt_batch(prompts(student.tokenizer)), 6, 0)
    finally:
        handle.remove()
        student.model.generation_config.eos_token_id = original
    stopped = [row for row in range(len(rollouts)) if rollouts.finished[row]]
    assert stopped
    for row in stopped:
        length = int(rollouts.completion_mask[row].sum())
        assert int(rollouts.completion_ids[row, length - 1]) in (stop, student.tokenizer.eos_token_id)
        assert (rollouts.completion_ids[row, : length - 1] != stop).all()


def test_bf16_sampling_uses_a_copy_of_the_current_master_weights(tiny_models):
    student = load_model(str(tiny_models["student"]), "student", CPU.device)  # fp32 master weights
    sampler = model_sampler(student, 12, precision=Precision(CPU.device, torch.bfloat16), low_precision_copy=True)
    rollouts = sampler.sample(prompt_batch(prompts(student.tokenizer)), 3, 0)
    # ℓˢ is the bf16 model's: close to the fp32 recompute of the same tokens, within bf16 rounding.
    reference = recompute_logprobs(student, rollouts, 1.0) * rollouts.completion_mask
    difference = (rollouts.sampler_logprobs - reference).abs()
    assert float(difference.max()) < 0.1 and float(masked_mean(difference, rollouts.completion_mask)) < 0.03
    assert float(difference.max()) > 0  # it really sampled in bf16
    copy = sampler.sampling_model()
    assert all(p.dtype == torch.float32 for p in student.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
    assert all(b.dtype == torch.float32 for b in copy.buffers() if b.is_floating_point())  # RoPE stays fp32
    with torch.no_grad():  # an optimizer step on the master...
        for parameter in student.model.parameters():
            parameter.add_(0.01)
    for mine, master in zip(sampler.sampling_model().parameters(), student.model.parameters()):
        assert torch.equal(mine, master.to(torch.bfloat16))  # ...reaches the next call's copy


def test_bf16_sampling_on_a_cpu_uses_the_fp32_weights_unless_asked(tiny_models):
    student = load_model(str(tiny_models["student"]), "student", CPU.device)
    assert model_sampler(student, 4, precision=Precision(CPU.device, torch.bfloat16)).sampling_model() is student.model


@pytest.mark.parametrize("kind", ["reverse_kl_pg", "forward_kl"])
def test_micro_batches_of_different_lengths_give_the_whole_batch_gradient(models, kind):
    """Each micro-batch is trimmed to its own longest completion; advantages and teacher states of
    the whole step must be read at the same positions (a review found them misread)."""
    student, teacher = models["student"], local_teacher(models["teacher"])
    rollouts = sample_with_early_eos(models)
    lengths = rollouts.completion_mask.sum(1)
    order = torch.argsort(lengths)  # short rollouts first: the first micro-batches are trimmed narrower
    rollouts = rollouts.select(order)
    assert rollouts.select(slice(0, 4)).completion_ids.shape[1] < rollouts.completion_ids.shape[1]
    rollouts = teacher.score(rollouts, keep_hidden=True).attach(rollouts)
    objective = (
        PolicyGradient(1.0, 0, 1.0, None, kl_coef=1.0, discount=0.5)
        if kind == "reverse_kl_pg"
        else Divergence(losses.forward_kl, 1.0)
    )
    whole_loss, whole = gradient_of(student, teacher, rollouts, objective, len(rollouts), chunk_size=7)
    split_loss, split = gradient_of(student, teacher, rollouts, objective, 4, chunk_size=7)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-4)


def test_a_prompts_samples_depend_on_its_key_not_on_the_batch_it_is_in(models):
    """Each prompt draws from the stream of (seed, its key): sampled beside other prompts or alone, in
    another order, it gives the same tokens and log-probs. This is what makes 2 ranks x P prompts equal
    1 rank x 2P prompts. Another key gives other samples."""
    student = models["student"]
    first, second = prompts(student.tokenizer)
    sampler = model_sampler(student, 10)

    def keyed(token_ids, keys):
        batch = prompt_batch(token_ids)
        batch.keys = keys
        return sampler.sample(batch, 3, seed=7)

    together = keyed([first, second], [5, 9])
    alone = keyed([second], [9])
    swapped = keyed([second, first], [9, 5])
    for part, rows in ((alone, slice(0, 3)), (swapped, slice(0, 3))):
        width = int(together.completion_mask[3:].sum(1).max())
        assert torch.equal(part.completion_ids[rows, :width], together.completion_ids[3:, :width])
        torch.testing.assert_close(
            part.sampler_logprobs[rows, :width], together.sampler_logprobs[3:, :width], atol=1e-5, rtol=0
        )
    other_key = keyed([second], [10])
    assert not torch.equal(other_key.completion_ids, alone.completion_ids)
