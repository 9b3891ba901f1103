"""Everything before the first step: check inputs, load data and models, build the optimizer, resume.

Inputs are checked cheapest first (paths, data, tokenizers) so bad input fails in seconds, before any
weights load, and the run directory is only created once everything has been checked.
"""

from __future__ import annotations

import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from opd.checkpoint import latest_checkpoint, load_trainer_state, restore_rng
from opd.config import Config, dump_config
from opd.data import PromptSet, PromptStream, load_prompts
from opd.errors import ConfigError
from opd.host_memory import keep_freed_memory
from opd.models import LoadedModel, check_same_vocabulary, check_source, load_model, load_tokenizer
from opd.objective import chunk_tokens
from opd.rollout import HFSampler, ReferenceSampler, Sampler
from opd.teacher import LocalTeacher
from opd.trackers import check_trackers


@dataclass
class Session:
    output_dir: Path
    device: torch.device
    autocast_dtype: torch.dtype | None
    student: LoadedModel
    teacher: LocalTeacher | None  # None only in SFT on the data set's answers without a teacher
    sampler: Sampler  # writes the training rollouts: the student, or for sft the teacher or the data
    student_sampler: HFSampler  # the student's own samples, for evaluation
    train_prompts: PromptSet
    eval_prompts: PromptSet | None
    stream: PromptStream
    generator: torch.Generator
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    start_step: int
    start_flops: float  # training FLOPs spent before start_step (see opd.flops)


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device: 'cuda' was asked for but no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def resolve_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast (fp32 master weights) where the hardware does bf16 fast, else None (fp32)."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if precision == "bf16" and not supported:
        raise ConfigError(f"run.precision: bf16 is not supported on this {device.type} device")
    return torch.bfloat16 if supported else None


def lr_schedule(config: Config):
    """Linear warmup, then cosine decay to min_lr_ratio * lr, or constant. Returns step -> factor."""
    optim, total = config.optim, config.run.max_steps

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        if optim.schedule == "constant":
            return 1.0
        progress = (step - optim.warmup_steps) / max(1, total - optim.warmup_steps)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def check_output_dir(output_dir: Path, resume: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"run.output_dir: '{output_dir}' is a file, not a directory")
    holds_run = (output_dir / "metrics.jsonl").exists() or (output_dir / "checkpoints").exists()
    if holds_run and not resume:
        raise ConfigError(
            f"run.output_dir: '{output_dir}' already holds a run; pass --resume to continue it or choose another directory"
        )


# Keys that may change between a run and its resumption: they don't change what the steps compute.
_RESUMABLE_CHANGES = {"run.max_steps", "run.save_every", "run.eval_every", "run.log_every", "run.progress",
                      "run.report_to", "run.wandb_project"}


def _check_resumable(output_dir: Path, config: Config) -> None:
    """Refuse to resume with settings that would make the saved state mean something else."""
    saved_path = output_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = _flatten(yaml.safe_load(saved_path.read_text()))
    current = _flatten(config.model_dump(mode="json"))
    changed = sorted(key for key in saved.keys() | current.keys()
                     if saved.get(key) != current.get(key) and key not in _RESUMABLE_CHANGES)
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed)
        raise ConfigError(f"--resume: the config differs from the run's {saved_path} in {details}; "
                          f"only {', '.join(sorted(_RESUMABLE_CHANGES))} may change")


def _flatten(node: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _check_context(model: LoadedModel, key: str, config: Config) -> None:
    limit = getattr(model.model.config, "max_position_embeddings", None)
    needed = config.data.max_prompt_tokens + config.rollout.max_new_tokens
    if limit is not None and needed > limit:
        raise ConfigError(
            f"data.max_prompt_tokens + rollout.max_new_tokens = {needed} exceeds {key}'s context of {limit} tokens"
        )


def prepare(config: Config, resume: bool, log=print) -> Session:
    output_dir = Path(config.run.output_dir)
    check_output_dir(output_dir, resume)
    device = resolve_device(config.run.device)
    if device.type == "cpu":
        keep_freed_memory()
    autocast_dtype = resolve_autocast(config.run.precision, device)
    check_trackers(config.run.report_to)
    check_source(config.student.path, "student.path")
    teacher_config = config.teacher
    if teacher_config is not None:
        check_source(teacher_config.path, "teacher.path")
    tokenizer = load_tokenizer(config.student.path, "student.path", config.student.trust_remote_code)
    if teacher_config is not None:
        check_same_vocabulary(tokenizer, load_tokenizer(teacher_config.path, "teacher.path", teacher_config.trust_remote_code))
    data = config.data
    prompt_options = (tokenizer, data.max_prompt_tokens, data.system_prompt, data.chat_template_kwargs)
    train_prompts = load_prompts(data.train, "data.train", *prompt_options)
    eval_prompts = load_prompts(data.eval, "data.eval", *prompt_options) if data.eval else None
    reference_sampler = None
    if config.rollout.source == "dataset":  # checks that every row has an answer, before weights load
        reference_sampler = ReferenceSampler(train_prompts, tokenizer, config.rollout.max_new_tokens, device)
    for prompts in filter(None, (train_prompts, eval_prompts)):
        if prompts.skipped_too_long:
            log(f"warning: skipped {prompts.skipped_too_long} prompts of '{prompts.source}' longer than "
                f"data.max_prompt_tokens={config.data.max_prompt_tokens}; {len(prompts)} remain")

    random.seed(config.run.seed)
    torch.manual_seed(config.run.seed)
    checkpoint = latest_checkpoint(output_dir) if resume else None
    if checkpoint is not None:
        _check_resumable(output_dir, config)
    student_source = (str(checkpoint), "resumed checkpoint") if checkpoint else (config.student.path, "student.path")
    student = load_model(*student_source, device, config.student.trust_remote_code)
    _check_context(student, "student.path", config)
    teacher = None
    if teacher_config is not None:
        teacher_model = load_model(teacher_config.path, "teacher.path", device, teacher_config.trust_remote_code,
                                   dtype=autocast_dtype or torch.float32)
        _check_context(teacher_model, "teacher.path", config)
        chunk = chunk_tokens(config.loss.chunk_size, teacher_model.vocab_size)
        teacher = LocalTeacher(teacher_model, teacher_config.temperature, chunk, autocast_dtype)

    # On-policy: the policy that is trained must be the one that sampled, so dropout stays off.
    student.model.eval()
    optimizer = torch.optim.AdamW(
        student.model.parameters(), lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config))
    generator = torch.Generator(device=device).manual_seed(config.run.seed)
    stream = PromptStream(len(train_prompts), config.run.seed, config.data.shuffle)

    start_step, start_flops = 0, 0.0
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"], generator)
        stream.consumed = state["prompts_consumed"]
        start_flops = state.get("flops", 0.0)
        start_step = state["step"]
        log(f"resuming from {checkpoint} (step {start_step})")
    elif resume:
        log(f"no complete checkpoint in '{output_dir}'; starting from step 0")

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(dump_config(config))
    shutil.rmtree(output_dir / "final", ignore_errors=True)  # only a finished run may show a final model
    rollout = config.rollout
    sampling = (rollout.max_new_tokens, rollout.temperature, rollout.top_k, rollout.top_p, autocast_dtype)
    student_sampler = HFSampler(student, *sampling)
    samplers = {
        "student": lambda: student_sampler,
        "teacher": lambda: HFSampler(teacher.teacher, *sampling),
        "dataset": lambda: reference_sampler,
    }
    return Session(
        output_dir=output_dir, device=device, autocast_dtype=autocast_dtype, student=student,
        teacher=teacher,
        sampler=samplers[rollout.source](), student_sampler=student_sampler,
        train_prompts=train_prompts, eval_prompts=eval_prompts, stream=stream, generator=generator,
        optimizer=optimizer, scheduler=scheduler, start_step=start_step, start_flops=start_flops,
    )
