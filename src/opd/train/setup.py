"""Everything before the first step: check inputs, load data and models, build the optimizer, resume.

`prepare` runs its steps in this order, cheapest first, so bad input fails in seconds, before any
weights load; the run directory is only written once everything has been checked. `opd train
--dry-run` runs the same `check_inputs`.
"""

from __future__ import annotations

import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from opd.config.capabilities import FULL_DISTRIBUTION, needed
from opd.config.files import dump_config
from opd.config.resolve import (
    REQUEST_FILE,
    RESOLVED_FILE,
    far_start,
    on_policy,
    recorded_resolution,
    resolve,
    why_not_far,
)
from opd.config.schema import Config
from opd.data.prompts import PromptSet, PromptStream, load_prompts, load_train_prompts
from opd.distributed.sharding import shard_model
from opd.distributed.world import World
from opd.errors import ConfigError
from opd.io.checkpoint import load_checkpoint
from opd.io.sinks import check_trackers
from opd.models.lm_head import locate_lm_head
from opd.models.loading import (
    LoadedModel,
    check_context,
    check_model_path,
    load_model,
    load_tokenizer,
    model_config,
)
from opd.models.lora import add_adapters, check_lora
from opd.models.precision import Precision
from opd.objectives.kinds import Objective, build_objective
from opd.ops.flops import matmul_parameters
from opd.ops.logprobs import tokens_per_chunk
from opd.rewards.verifiers import RewardScorer, check_rows, load_verifier
from opd.rollout.answers import DatasetAnswers
from opd.rollout.engines import ENGINES
from opd.rollout.mixture import RolloutMix, build_rollouts
from opd.rollout.sampler import ModelSampler, SamplingSettings
from opd.teachers.base import TokenScorer
from opd.teachers.build import TeacherPlan, load_teachers, plan_views, probe_servers
from opd.teachers.remote import RemoteTeacher
from opd.teachers.routed import check_routes
from opd.train.guard import CollapseGuard
from opd.train.host_memory import keep_freed_memory
from opd.train.memory import PeakMemory
from opd.train.resume import find_checkpoint, restored_in_flight
from opd.train.served_teacher import ServedTeacherSampler


@dataclass
class Session:
    """Everything a run's steps use, built once by `prepare`."""

    config: Config  # the resolved config (opd.config.resolve): what the run computes with
    output_dir: Path
    world: World
    sharded: bool  # the student is sharded with FSDP2 across the world's ranks
    precision: Precision
    student: LoadedModel
    teacher: TokenScorer | None  # local, remote, viewed or routed; None only in SFT on the data's answers without one
    teacher_sharded: bool  # a teacher is sharded with FSDP2: every rank must call it equally often
    needs: set[str]  # what the run needs of its teacher (opd.config.capabilities)
    objective: Objective
    rollouts: (
        RolloutMix  # writes the training rollouts: the student's engine, for sft the teacher or the data, or a mix
    )
    student_sampler: ModelSampler  # the student's own samples, for evaluation (exact entropy)
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
    start_flops: float  # training FLOPs spent before start_step (see opd.ops.flops)
    peak_memory: PeakMemory
    rewards: RewardScorer | None = None  # grades the student's completions where the run has a reward
    # The SampledBatch-es the checkpoint kept, sampled ahead of start_step (opd.train.pipeline).
    in_flight: list = field(default_factory=list)
    # With rollout.student_fraction auto undecided: the resolved config and rollouts of a far start
    # (opd.config.resolve.far_start), which step 0 switches to where it measures the student far.
    far_config: Config | None = None
    far_rollouts: RolloutMix | None = None

    @property
    def keeps_teacher_hidden(self) -> bool:
        """The teacher's hidden states are kept for the loss (a full-distribution need)."""
        return FULL_DISTRIBUTION in self.needs

    def close(self) -> None:
        """Release the rollout engines (before the process group goes: an engine may hold groups of it)."""
        self.rollouts.close()


def sampled_by_teacher_distribution(config: Config) -> bool:
    """True when the teacher sampled the rollouts under exactly the distribution it scores with: the
    sampler's log-probs are then ℓᵀ already, and a second teacher forward would only repeat them."""
    rollout, teacher = config.rollout, config.teacher
    return (
        rollout.source == "teacher"
        and teacher is not None
        and rollout.temperature == teacher.temperature
        and not rollout.truncated
    )


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


def check_output_dir(output_dir: Path, resume: bool | str) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"run.output_dir: '{output_dir}' is a file, not a directory")
    holds_run = (output_dir / "metrics.jsonl").exists() or (output_dir / "checkpoints").exists()
    if holds_run and not resume:
        raise ConfigError(
            f"run.output_dir: '{output_dir}' already holds a run; pass --resume to continue it or choose another "
            "directory"
        )


def check_inputs(config: Config, ranks: int, resume: bool | str) -> None:
    """What needs neither weights nor network, for `prepare` and `--dry-run` alike: the run directory,
    the step's split over `ranks`, the models' paths."""
    check_output_dir(Path(config.run.output_dir), resume)
    if config.batch.prompts_per_step % ranks:
        raise ConfigError(
            f"batch.prompts_per_step={config.batch.prompts_per_step} does not divide by the "
            f"world size {ranks}: each rank takes an equal share of a step's prompts"
        )
    check_model_path(config.student.path, "student.path")
    ENGINES[config.rollout.engine].check(config)
    for name, settings in config.teacher_configs.items():
        if not settings.remote:
            check_model_path(config.teacher_path(name), f"{config.teacher_key(name)}.path")
        elif settings.lm_head is not None:  # found in its files now; read once the student has loaded
            locate_lm_head(settings.lm_head, f"{config.teacher_key(name)}.lm_head", settings.trust_remote_code)
    if config.reward is not None:
        load_verifier(config.reward.verifier)  # imported here: a typo fails before any weight loads


def load_data(config: Config, tokenizer, log=print) -> tuple[PromptSet, PromptSet | None]:
    """The training and evaluation prompts, each row routed to a known teacher and checked as its
    rollout source needs."""
    data = config.data
    options = (tokenizer, data.max_prompt_tokens, data.system_prompt, data.chat_template_kwargs)
    train_prompts = load_train_prompts(data.train, "data.train", *options)
    eval_prompts = load_prompts(data.eval, "data.eval", *options) if data.eval else None
    if config.teachers:
        check_routes(train_prompts, list(config.teacher_configs), "data.train")
        check_routes(eval_prompts, list(config.teacher_configs), "data.eval")
    if config.rollout.source == "dataset" or (config.mixed and config.rollout.off_policy_source == "dataset"):
        DatasetAnswers.check(train_prompts)
    if config.reward is not None:
        for prompts in filter(None, (train_prompts, eval_prompts)):
            check_rows(config.reward.verifier, prompts)
    for prompts in filter(None, (train_prompts, eval_prompts)):
        if prompts.skipped_too_long:
            log(
                f"warning: skipped {prompts.skipped_too_long} prompts of '{prompts.path}' longer than "
                f"data.max_prompt_tokens={data.max_prompt_tokens}; {len(prompts)} remain"
            )
    return train_prompts, eval_prompts


def load_student(config: Config, precision: Precision, world: World) -> tuple[LoadedModel, bool]:
    """The initial student, with LoRA adapters where asked, in eval mode (on-policy, the policy trained must
    be the one that sampled, so dropout stays off), sharded under torchrun where asked. Returns it and
    whether it is sharded; a checkpoint's weights are loaded into it once it is laid out for this world."""
    student = load_model(config.student.path, "student.path", precision.device, config.student.trust_remote_code)
    if config.student.lora is not None:
        student = add_adapters(student, config.student.lora)
    student.model.eval()
    sharded = config.student.shard and world.size > 1
    if sharded:
        shard_model(student.model, precision.device, precision.autocast_dtype)
    return student, sharded


def build_optimizer(config: Config, student: LoadedModel):
    """AdamW over the trainable weights, and its schedule (lr_schedule)."""
    optim = config.optim
    trainable = [parameter for parameter in student.model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config))


def write_run_dir(request: Config, config: Config, world: World) -> None:
    """config.yaml (what the user asked) and resolved.yaml (what it resolved to), written once every rank
    has checked the run directory; a finished run alone may show a final model, so an old final/ goes."""
    output_dir = Path(config.run.output_dir)
    world.barrier()
    if world.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / REQUEST_FILE).write_text(dump_config(request))
        (output_dir / RESOLVED_FILE).write_text(dump_config(config))
        shutil.rmtree(output_dir / "final", ignore_errors=True)


@dataclass
class Inputs:
    """What a run reads before any weight loads (read_inputs)."""

    config: Config  # resolved
    tokenizer: PreTrainedTokenizerBase  # the student's
    train_prompts: PromptSet
    eval_prompts: PromptSet | None
    teacher_plan: TeacherPlan
    checkpoint: Path | None  # where --resume continues from
    far_config: Config | None = None  # resolved far_start, while rollout.student_fraction auto is undecided


def check_contexts(config: Config) -> None:
    """The configured lengths within the student's and each local teacher's context, from their config.json."""
    lengths = config.data.max_prompt_tokens + config.rollout.max_new_tokens
    models = [("student.path", config.student.path, config.student.trust_remote_code)]
    for name, settings in config.teacher_configs.items():
        if not settings.remote:
            models.append((f"{config.teacher_key(name)}.path", config.teacher_path(name), settings.trust_remote_code))
    for key, path, trust_remote_code in models:
        check_context(
            model_config(path, key, trust_remote_code), lengths, "data.max_prompt_tokens + rollout.max_new_tokens", key
        )


def read_inputs(request: Config, resume: bool | str, log=print, probe: bool = True) -> Inputs:
    """Every check and read before the first weight loads, after check_inputs: trackers, LoRA, the
    student's tokenizer, the context windows, the data, each teacher's view, the resolved config, the
    servers (unless probe is False: the dry run starts no connection) and the checkpoint to resume. `opd
    train --dry-run` runs this same function, so that its "config OK" means training starts."""
    check_trackers(request.run.report_to)
    if request.student.lora is not None:
        check_lora(request.student.lora, request.student.path, request.student.trust_remote_code)
    tokenizer = load_tokenizer(request.student.path, "student.path", request.student.trust_remote_code)
    check_contexts(request)
    train_prompts, eval_prompts = load_data(request, tokenizer, log)
    rows = [row for prompts in (train_prompts, eval_prompts) if prompts is not None for row in prompts.examples]
    teacher_plan = plan_views(request, tokenizer, rows)  # every view rendered
    recorded = recorded_resolution(Path(request.run.output_dir)) if resume else None
    config = resolve(request, teacher_plan.facts, recorded)
    if probe:
        probe_servers(config, teacher_plan, tokenizer)  # every server asked
    checkpoint = find_checkpoint(config, resume, log)
    if checkpoint is None and recorded is not None and request.rollout.student_fraction == "auto":
        config = resolve(request, teacher_plan.facts)  # nothing to resume: step 0 measures the student again
    config, far_config = plan_far_start(request, config, teacher_plan, train_prompts, checkpoint is None, log)
    return Inputs(config, tokenizer, train_prompts, eval_prompts, teacher_plan, checkpoint, far_config)


def plan_far_start(
    request: Config, config: Config, plan: TeacherPlan, train_prompts: PromptSet, fresh: bool, log=print
) -> tuple[Config, Config | None]:
    """The resolved config, and with rollout.student_fraction auto undecided the resolved config of a far
    start (far_start) for step 0 to switch to (opd.train.start). A fresh run that can't start far is
    on-policy, and says why."""
    reason = None
    if config.rollout.student_fraction == "auto":
        far_config = resolve(far_start(request), plan.facts)
        if far_config.rollout.off_policy_source == "teacher" or DatasetAnswers.answered(train_prompts):
            return config, far_config
        reason = f"rollout.off_policy_source=dataset needs an 'answer' on every row of {train_prompts.path}"
        config = on_policy(config)
    elif request.rollout.student_fraction == "auto" and request.rollout.source == "student" and fresh:
        reason = why_not_far(request, plan.facts)
    if reason is not None:
        log(f"rollout.student_fraction auto: on-policy, not measured: this run can't start a far student ({reason})")
    return config, None


def prepare(request: Config, resume: bool | str, log=print, world: World | None = None) -> Session:
    """Check, load and build everything for a run. request: the validated config as the user asked it;
    the session carries it resolved (opd.config.resolve). world: the torchrun world (default: from the
    environment; a world of one without torchrun). Only rank 0 writes to the run directory."""
    world = world or World.from_environment()
    check_inputs(request, world.size, resume)
    precision = Precision.resolve(request.run.precision, request.run.device, world.local_rank)
    peak_memory = PeakMemory(precision.device)
    peak_memory.start()  # before any weights: the growth from here is what the memory plan predicts
    world.start(precision.device)
    if precision.device.type == "cpu":
        keep_freed_memory()
    inputs = read_inputs(request, resume, log)
    config, checkpoint, tokenizer = inputs.config, inputs.checkpoint, inputs.tokenizer
    train_prompts, eval_prompts, teacher_plan = inputs.train_prompts, inputs.eval_prompts, inputs.teacher_plan
    output_dir = Path(config.run.output_dir)

    random.seed(config.run.seed)
    torch.manual_seed(config.run.seed)
    student, sharded = load_student(config, precision, world)
    teachers = load_teachers(config, teacher_plan, precision, world)
    optimizer, scheduler = build_optimizer(config, student)
    stream = PromptStream(len(train_prompts), config.run.seed, config.data.shuffle)
    run = config.run
    guard = CollapseGuard(
        run.collapse_guard,
        run.collapse_entropy_fraction,
        run.collapse_reference,
        run.collapse_repetition,
        run.collapse_patience,
    )
    start_step, start_flops, in_flight = 0, 0.0, []
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, student, optimizer, world)
        scheduler.load_state_dict(state["scheduler"])
        stream = PromptStream(len(train_prompts), config.run.seed, config.data.shuffle, state["prompts_consumed"])
        start_flops, start_step = state.get("flops", 0.0), state["step"]
        if state.get("guard"):
            guard.load_state_dict(state["guard"])
        log(f"resuming from {checkpoint} (step {start_step}, written by {state.get('world_size', 1)} ranks)")
        in_flight = restored_in_flight(state, world, precision.device, log)
    write_run_dir(request, config, world)

    engine = ENGINES[config.rollout.engine].build(config, student, precision)  # the training rollouts
    # Evaluation samples with opd's own sampler (exact entropy): the engine itself where it is opd's.
    student_sampler = (
        engine
        if isinstance(engine, ModelSampler)
        else ModelSampler(student, SamplingSettings.of(config.rollout), precision)
    )
    # The teacher writes rows with its model here, or through its server (opd.train.served_teacher).
    writer, stops = teachers.writer, student.stop_token_ids  # the teacher's rows end at the student's stops too
    if isinstance(writer, RemoteTeacher):
        settings = SamplingSettings.of(config.rollout)
        writer = ServedTeacherSampler(writer, settings, stops, student.tokenizer.pad_token_id, precision.device)
    far_config = inputs.far_config
    far_rollouts = None
    if far_config is not None:  # the same engine, the teacher's samples beside it
        far_rollouts = build_rollouts(far_config, engine, writer, train_prompts, student.tokenizer, precision, stops)
    return Session(
        config=config,
        output_dir=output_dir,
        world=world,
        sharded=sharded,
        precision=precision,
        student=student,
        teacher=teachers.scorer,
        teacher_sharded=teachers.sharded,
        needs=needed(config),
        objective=build_objective(config),
        rollouts=build_rollouts(config, engine, writer, train_prompts, student.tokenizer, precision, stops),
        student_sampler=student_sampler,
        scored_by_sampler=sampled_by_teacher_distribution(config),
        chunk_size=tokens_per_chunk(config.loss.chunk_size, student.vocab_size),
        student_params=matmul_parameters(student.model),
        train_prompts=train_prompts,
        eval_prompts=eval_prompts,
        stream=stream,
        optimizer=optimizer,
        scheduler=scheduler,
        guard=guard,
        start_step=start_step,
        start_flops=start_flops,
        peak_memory=peak_memory,
        rewards=RewardScorer(config.reward.verifier, tokenizer) if config.reward is not None else None,
        in_flight=in_flight,
        far_config=far_config,
        far_rollouts=far_rollouts,
    )
