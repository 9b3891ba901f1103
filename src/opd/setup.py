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

from opd.answers import DatasetAnswers
from opd.checkpoint import check_checkpoint, latest_checkpoint, load_checkpoint
from opd.config import FULL_DISTRIBUTION, TOP_K, Config, dump_config
from opd.data import PromptSet, PromptStream, load_prompts, load_train_prompts
from opd.distributed import World
from opd.errors import ConfigError
from opd.factory import load_teacher, make_rollouts, make_sampler, sampling_settings
from opd.flops import matmul_parameters
from opd.guard import CollapseGuard
from opd.host_memory import keep_freed_memory
from opd.loading import LoadedModel, check_source, load_model, load_tokenizer, stop_token_ids
from opd.lora import add_adapters, check_lora
from opd.memory import PeakMemory
from opd.objectives import Objective, build_objective
from opd.precision import Precision
from opd.mixture import RolloutMix
from opd.sampling import ModelSampler
from opd.sharding import shard_model
from opd.sinks import check_trackers
from opd.remote_teacher import RemoteTeacher
from opd.routing import RoutedTeachers, check_routes, route
from opd.teacher import LocalTeacher
from opd.teacher_view import TeacherView, ViewedTeacher, ViewSettings
from opd.update import tokens_per_chunk


@dataclass
class Session:
    output_dir: Path
    world: World
    sharded: bool  # the student is sharded with FSDP2 across the world's ranks
    precision: Precision
    student: LoadedModel
    teacher: LocalTeacher | RemoteTeacher | RoutedTeachers | None  # None only in SFT on the data's answers without one
    objective: Objective
    rollouts: RolloutMix  # writes the training rollouts: the student, for sft the teacher or the data, or a mix
    student_sampler: ModelSampler  # the student's own samples, for evaluation
    scored_by_sampler: bool  # the sampler's log-probs are already ℓᵀ (see sampled_by_teacher_distribution)
    chunk_size: int  # completion tokens per chunk of full-vocabulary logits
    student_params: int  # parameters in matrix products, for FLOP accounting
    train_prompts: PromptSet
    eval_prompts: PromptSet | None
    stream: PromptStream
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    guard: CollapseGuard
    start_step: int
    start_flops: float  # training FLOPs spent before start_step (see opd.flops)
    peak_memory: PeakMemory


def sampled_by_teacher_distribution(config: Config) -> bool:
    """True when the teacher sampled the rollouts under exactly the distribution it scores with: the
    sampler's log-probs are then ℓᵀ already, and a second teacher forward would only repeat them."""
    rollout, teacher = config.rollout, config.teacher
    return (rollout.source == "teacher" and teacher is not None and rollout.temperature == teacher.temperature
            and rollout.top_k == 0 and rollout.top_p == 1)


def lr_schedule(config: Config):
    """Linear warmup, then cosine decay to min_lr_ratio * lr, or constant. Returns step -> factor."""
    optim, total = config.optim, config.decay_steps

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


# Keys that may change between a run and its resumption: they don't change what the steps compute
# (sharding changes the layout only; DCP checkpoints load into either).
_RESUMABLE_CHANGES = {"run.max_steps", "run.save_every", "run.eval_every", "run.log_every", "run.progress",
                      "run.report_to", "run.wandb_project", "student.shard", "teacher.shard",
                      # where and how a teacher on a server is reached (it must serve the same model)
                      "teacher.url", "teacher.api_key_env", "teacher.timeout_s", "teacher.concurrency",
                      "teacher.request_tokens", "teacher.retry_deadline_s"}


def _check_resumable(output_dir: Path, config: Config) -> None:
    """Refuse to resume with settings that would make the saved state mean something else."""
    saved_path = output_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved_config = yaml.safe_load(saved_path.read_text())
    saved, current = _flatten(saved_config), _flatten(config.model_dump(mode="json"))
    # The cosine horizon is what the schedule depends on: max_steps may grow, decay_steps may name the
    # old horizon, as long as the effective horizon stays the same.
    for flat, horizon in ((saved, _saved_horizon(saved)), (current, config.decay_steps)):
        flat["optim.decay_steps"] = horizon if flat.get("optim.schedule") == "cosine" else None
    changed = sorted(key for key in saved.keys() | current.keys()
                     if saved.get(key) != current.get(key) and key not in _RESUMABLE_CHANGES)
    if "optim.decay_steps" in changed:
        raise ConfigError(
            f"--resume: run.max_steps {saved.get('run.max_steps')} -> {config.run.max_steps} would stretch the cosine "
            f"schedule that the saved steps followed; keep it with --set optim.decay_steps={saved['optim.decay_steps']}")
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed)
        raise ConfigError(f"--resume: the config differs from the run's {saved_path} in {details}; "
                          f"only {', '.join(sorted(_RESUMABLE_CHANGES))} may change")


def _saved_horizon(saved: dict) -> int | None:
    return saved.get("optim.decay_steps") or saved.get("run.max_steps")


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


def teacher_view(config: Config, name: str, student_tokenizer, examples: list) -> TeacherView | None:
    """The teacher's own view of its rows `examples` (opd.teacher_view), or None where it reads them as the
    student does: one vocabulary, the student's template, no privileged context. Checked before any
    weight loads, every row rendered."""
    settings, key = config.teacher_configs[name], config.teacher_key(name)
    source = settings.tokenizer or (None if settings.remote else settings.path)
    teacher_tokenizer = student_tokenizer if source is None else load_tokenizer(
        source, f"{key}.tokenizer" if settings.tokenizer else f"{key}.path", settings.trust_remote_code)
    data = config.data
    teacher_system = data.system_prompt if data.teacher_system_prompt is None else data.teacher_system_prompt
    view_settings = ViewSettings(settings.chat_template, teacher_system or None,
                                 data.teacher_context_format, data.chat_template_kwargs, settings.alignment,
                                 student_system_prompt=data.system_prompt)
    try:
        view = TeacherView(student_tokenizer, teacher_tokenizer,
                           stop_token_ids(config.student.path, student_tokenizer), view_settings)
    except ValueError as exc:
        raise ConfigError(f"{key}.alignment: {exc}") from None
    if view.chunked and config.teacher_needs in (TOP_K, FULL_DISTRIBUTION):
        raise ConfigError(f"{key}: its tokenizer differs from the student's, and loss.kind={config.loss.kind} (or a "
                          "forward-KL term) compares distributions over one vocabulary at every token; across "
                          "tokenizers only the sampled text's log-probs compare, chunk by chunk: use reverse_kl_pg")
    if view.ends_turns_differently and config.teacher_needs in (TOP_K, FULL_DISTRIBUTION):
        raise ConfigError(f"{key}.chat_template=own: the teacher ends turns with a token the student never stops on, "
                          "so their distributions at the last position are over different events; use reverse_kl_pg")
    if not view.needed(examples):
        return None
    if config.teacher_writes:
        raise ConfigError(f"{key}: it reads rows its own way (another tokenizer, its own template or privileged "
                          "context), so its samples are not the student's tokens of the student's prompt; it can "
                          "score rollouts, not write them (rollout.source / rollout.off_policy_source teacher)")
    view.teacher_prompts(examples)  # every row rendered for the teacher now: a row it can't render fails here
    return view


def prepare(config: Config, resume: bool, log=print, world: World | None = None) -> Session:
    """Check, load and build everything for a run. world: the torchrun world (default: from the
    environment; a world of one without torchrun). Only rank 0 writes to the run directory."""
    world = world or World.from_environment()
    output_dir = Path(config.run.output_dir)
    check_output_dir(output_dir, resume)
    if config.batch.prompts_per_step % world.size:
        raise ConfigError(f"batch.prompts_per_step={config.batch.prompts_per_step} does not divide by the "
                          f"world size {world.size}: each rank takes an equal share of a step's prompts")
    precision = Precision.resolve(config.run.precision, config.run.device, world.local_rank)
    peak_memory = PeakMemory(precision.device)
    peak_memory.start()  # before any weights: the growth from here is what the memory plan predicts
    world.start(precision.device)
    if precision.device.type == "cpu":
        keep_freed_memory()
    check_trackers(config.run.report_to)
    check_source(config.student.path, "student.path")
    if config.student.lora is not None:
        check_lora(config.student.lora, config.student.path, config.student.trust_remote_code)
    teacher_configs = config.teacher_configs  # by name; the one `teacher` is named "teacher"
    for name, settings in teacher_configs.items():
        if not settings.remote:
            check_source(settings.path, f"{config.teacher_key(name)}.path")
    tokenizer = load_tokenizer(config.student.path, "student.path", config.student.trust_remote_code)
    data = config.data
    prompt_options = (tokenizer, data.max_prompt_tokens, data.system_prompt, data.chat_template_kwargs)
    train_prompts = load_train_prompts(data.train, "data.train", *prompt_options)
    eval_prompts = load_prompts(data.eval, "data.eval", *prompt_options) if data.eval else None
    if config.teachers:
        check_routes(train_prompts, list(teacher_configs), "data.train")
        check_routes(eval_prompts, list(teacher_configs), "data.eval")
    rows = [example for prompts in (train_prompts, eval_prompts) if prompts is not None for example in prompts.examples]
    names = list(teacher_configs)
    views = {name: teacher_view(config, name, tokenizer, [row for row in rows if route(row, names) == name])
             for name in names}
    scorers: dict = {}
    for name, settings in teacher_configs.items():
        if settings.remote:  # asked before any weight loads
            teacher_tokenizer = views[name].teacher_tokenizer if views[name] else tokenizer
            scorers[name] = RemoteTeacher(settings, len(teacher_tokenizer))
            scorers[name].check(teacher_tokenizer)
    if config.rollout.source == "dataset" or (config.mixed and config.rollout.off_policy_source == "dataset"):
        DatasetAnswers.check(train_prompts)  # before any weight loads
    for prompts in filter(None, (train_prompts, eval_prompts)):
        if prompts.skipped_too_long:
            log(f"warning: skipped {prompts.skipped_too_long} prompts of '{prompts.source}' longer than "
                f"data.max_prompt_tokens={config.data.max_prompt_tokens}; {len(prompts)} remain")

    random.seed(config.run.seed)
    torch.manual_seed(config.run.seed)
    checkpoint = latest_checkpoint(output_dir) if resume else None
    if checkpoint is not None:
        _check_resumable(output_dir, config)
        check_checkpoint(checkpoint)
    # The initial student; a checkpoint's weights are loaded into it once it is laid out for this world.
    student = load_model(config.student.path, "student.path", precision.device, config.student.trust_remote_code)
    if config.student.lora is not None:
        student = add_adapters(student, config.student.lora)
    _check_context(student, "student.path", config)
    for name, settings in teacher_configs.items():
        if settings.remote:
            continue
        key = f"{config.teacher_key(name)}.path"
        scorers[name] = load_teacher(settings.path, key, precision, settings.temperature, config.loss.chunk_size,
                                     settings.trust_remote_code, settings.top_k)
        _check_context(scorers[name].loaded, key, config)
        if settings.shard and world.size > 1:
            shard_model(scorers[name].model, precision.device)  # in its own dtype: bf16 under bf16, no optimizer
    scorers = {name: ViewedTeacher(scorer, views[name]) if views[name] else scorer for name, scorer in scorers.items()}
    teacher = RoutedTeachers(scorers) if config.teachers else next(iter(scorers.values()), None)

    # On-policy: the policy that is trained must be the one that sampled, so dropout stays off.
    student.model.eval()
    sharded = config.student.shard and world.size > 1
    if sharded:
        shard_model(student.model, precision.device, precision.autocast_dtype)
    optimizer = torch.optim.AdamW(
        [parameter for parameter in student.model.parameters() if parameter.requires_grad], lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config))
    stream = PromptStream(len(train_prompts), config.run.seed, config.data.shuffle)

    run = config.run
    guard = CollapseGuard(run.collapse_guard, run.collapse_entropy_fraction, run.collapse_reference,
                          run.collapse_repetition, run.collapse_patience)
    start_step, start_flops = 0, 0.0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, student, optimizer, world)
        scheduler.load_state_dict(state["scheduler"])
        stream.consumed = state["prompts_consumed"]
        start_flops = state.get("flops", 0.0)
        start_step = state["step"]
        if state.get("guard"):
            guard.load_state_dict(state["guard"])
        log(f"resuming from {checkpoint} (step {start_step}, written by {state.get('world_size', 1)} ranks)")
    elif resume:
        log(f"no complete checkpoint in '{output_dir}'; starting from step 0")

    world.barrier()  # every rank has checked the run directory before rank 0 writes to it
    if world.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(dump_config(config))
        shutil.rmtree(output_dir / "final", ignore_errors=True)  # only a finished run may show a final model
    student_sampler = make_sampler(student, sampling_settings(config.rollout), precision)
    return Session(
        output_dir=output_dir, world=world, sharded=sharded, precision=precision, student=student, teacher=teacher,
        objective=build_objective(config),
        rollouts=make_rollouts(config, student_sampler, teacher, train_prompts, precision),
        student_sampler=student_sampler,
        scored_by_sampler=sampled_by_teacher_distribution(config),
        chunk_size=tokens_per_chunk(config.loss.chunk_size, student.vocab_size),
        student_params=matmul_parameters(student.model),
        train_prompts=train_prompts, eval_prompts=eval_prompts, stream=stream,
        optimizer=optimizer, scheduler=scheduler, guard=guard, start_step=start_step, start_flops=start_flops,
        peak_memory=peak_memory,
    )
