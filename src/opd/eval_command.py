"""`opd eval`: a model's accuracy on a data set, and with a teacher the held-out distillation figures.
Models are built by `opd.factory`, as `opd train` builds them."""

from __future__ import annotations


from opd.data import load_prompts
from opd.evaluate import evaluate
from opd.factory import load_teacher, make_sampler
from opd.loading import load_model, load_tokenizer
from opd.precision import Precision
from opd.sampling import SamplingSettings
from opd.teacher_view import TeacherView, ViewedTeacher, ViewSettings


def evaluate_model(
    model_path: str,
    data: str,
    samples: int = 1,
    teacher_path: str | None = None,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    max_prompts: int | None = None,
    system_prompt: str | None = None,
    batch_rollouts: int = 64,
    seed: int = 0,
    precision: str = "auto",
    teacher_chat_template: str = "student",
) -> dict[str, float]:
    """`opd eval`: pass@1, pass@K and length of a model on a data set, and with a teacher the
    held-out distillation metrics (a teacher with another tokenizer: distill/seq_reverse_kl, from the chunk
    estimator). Samples at `temperature` (pass@1 is the mean over K samples).
    precision as `run.precision`: the same sampler, teacher and chunking as `opd train` builds."""
    precision = Precision.resolve(precision, "auto")
    student = load_model(model_path, "--model", precision.device)
    prompts = load_prompts(data, "--data", student.tokenizer, max_prompt_tokens=10**9, system_prompt=system_prompt)
    teacher = None
    if teacher_path is not None:
        # A teacher with another tokenizer (or template) scores its own view of each row: distill/seq_reverse_kl.
        view = TeacherView(student.tokenizer, load_tokenizer(teacher_path, "--teacher"), student.stop_token_ids,
                           ViewSettings(teacher_chat_template, system_prompt, student_system_prompt=system_prompt))
        teacher = load_teacher(teacher_path, "--teacher", precision)
        if view.needed(prompts.examples):
            teacher = ViewedTeacher(teacher, view)
    sampler = make_sampler(student, SamplingSettings(max_new_tokens, temperature), precision)
    metrics = evaluate(sampler, teacher, prompts, student.tokenizer, samples, max(1, batch_rollouts // samples),
                       seed, max_prompts)
    metrics["eval/prompts"] = min(len(prompts), max_prompts or len(prompts))
    return metrics
