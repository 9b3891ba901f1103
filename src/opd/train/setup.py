"""Everything before the first step: check inputs, load data and models, build the optimizer, resume.

`prepare` runs its steps in this order, cheapest first, so bad input fails in seconds, before any
weights load; the run directory is only written once everything has been checked. `opd train
--dry-run` runs the same `check_inputs`.
"""

from __future__ import annotations

import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from opd.config.files import dump_config
from opd.config.schema import Config
from opd.data.prompts import PromptSet, PromptStream, load_prompts, load_train_prompts
from opd.distributed.sharding import shard_model
from opd.distributed.world import World
from opd.errors import ConfigError
from opd.io.checkpoint import check_checkpoint, latest_checkpoint, load_checkpoint
from opd.io.sinks import check_trackers
from opd.models.loading import LoadedModel, architectures, check_context, check_source, load_model, load_tokenizer
from opd.models.lora import add_adapters, check_lora
from opd.models.precision import Precision
from opd.objectives.kinds import Objective, build_objective
from opd.ops.flops import matmul_parameters
from opd.ops.logprobs import tokens_per_chunk
from opd.rollout.answers import DatasetAnswers
from opd.rollout.mixture import RolloutMix, build_rollouts
from opd.rollout.sampler import ModelSampler, SamplingSettings
from opd.rollout.vllm_engine import VLLMSampler, check_engine
from opd.rewards.verifiers import RewardScorer, check_rows, load_verifier
from opd.teachers.base import TokenScorer
from opd.teachers.build import load_teachers, plan_teachers
from opd.teachers.routed import check_routes
from opd.train.guard import CollapseGuard
from opd.train.host_memory import keep_freed_memory
from opd.train.memory import PeakMemory
from opd.train.resume import check_resumable


@dataclass
class Session:
    output_dir: Path
    world: World
    sharded: bool  # the student is sharded with FSDP2 across the world's ranks
    precision: Precision
    student: LoadedModel
    teacher: TokenScorer | None  # local, remote, viewed or routed; None only in SFT on the data's answers without one
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
    start_flops: float  # training FLOPs spent before start_step (see opd.ops.flops)
    peak_memory: PeakMemory
    rewards: RewardScorer | None = None  # grades the student's completions where the run has a reward


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


def check_inputs(config: Config, ranks: int, resume: bool) -> None:
    """What needs neither weights nor network, for `prepare` and `--dry-run` alike: the run directory,
    the step's split over `ranks`, the models' paths."""
    check_output_dir(Path(config.run.output_dir), resume)
    if config.batch.prompts_per_step % ranks:
        raise ConfigError(f"batch.prompts_per_step={config.batch.prompts_per_step} does not divide by the "
                          f"world size {ranks}: each rank takes an equal share of a step's prompts")
    check_source(config.student.path, "student.path")
    if config.rollout.engine == "vllm":
        check_engine(config.student.path, architectures(config.student.path, "student.path", config.student.trust_remote_code))
    for name, settings in config.teacher_configs.items():
        if not settings.remote:
            check_source(settings.path, f"{config.teacher_key(name)}.path")
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
            log(f"warning: skipped {prompts.skipped_too_long} prompts of '{prompts.source}' longer than "
                f"data.max_prompt_tokens={data.max_prompt_tokens}; {len(prompts)} remain")
    return train_prompts, eval_prompts


def load_student(config: Config, precision: Precision, world: World) -> tuple[LoadedModel, bool]:
    """The initial student, with LoRA adapters where asked, in eval mode (on-policy, the policy trained must
    be the one that sampled, so dropout stays off), sharded under torchrun where asked. Returns it and
    whether it is sharded; a checkpoint's weights are loaded into it once it is laid out for this world."""
    student = load_model(config.student.path, "student.path", precision.device, config.student.trust_remote_code)
    if config.student.lora is not None:
        student = add_adapters(student, config.student.lora)
    check_context(student.model, config.data.max_prompt_tokens + config.rollout.max_new_tokens,
                  "data.max_prompt_tokens + rollout.max_new_tokens", "student.path")
    student.model.eval()
    sharded = config.student.shard and world.size > 1
    if sharded:
        shard_model(student.model, precision.device, precision.autocast_dtype)
    return student, sharded


def build_optimizer(config: Config, student: LoadedModel):
    """AdamW over the trainable weights, and its schedule (lr_schedule)."""
    optim = config.optim
    trainable = [parameter for parameter in student.model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                  weight_decay=optim.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config))


def find_checkpoint(config: Config, resume: bool, log=print) -> Path | None:
    """With --resume, the latest complete checkpoint, once the config is checked against the run's."""
    output_dir = Path(config.run.output_dir)
    checkpoint = latest_checkpoint(output_dir) if resume else None
    if checkpoint is not None:
        check_resumable(output_dir, config)
        check_checkpoint(checkpoint)
    elif resume:
        log(f"no complete checkpoint in '{output_dir}'; starting from step 0")
    return checkpoint


def write_run_dir(config: Config, world: World) -> None:
    """config.yaml, written once every rank has checked the run directory; a finished run alone may show
    a final model, so an old final/ goes."""
    output_dir = Path(config.run.output_dir)
    world.barrier()
    if world.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(dump_config(config))
        shutil.rmtree(output_dir / "final", ignore_errors=True)


def settle_forward_kl(config: Config, resume: bool) -> None:
    """Settle the default (null) loss.forward_kl_coef into config, which config.yaml then records. On
    resume, the run's recorded value is kept where it still applies (a run from before the default
    recorded 0), so an upgrade or a resumable change doesn't change the objective mid-run."""
    if config.loss.forward_kl_coef is not None:
        return
    saved_path = Path(config.run.output_dir) / "config.yaml"
    if resume and saved_path.is_file():
        recorded = (yaml.safe_load(saved_path.read_text()).get("loss") or {}).get("forward_kl_coef")
        if isinstance(recorded, (int, float)) and (recorded == 0 or config.forward_kl_weight):
            config.loss.forward_kl_coef = float(recorded)
            return
    config.loss.forward_kl_coef = config.forward_kl_weight


def prepare(config: Config, resume: bool, log=print, world: World | None = None) -> Session:
    """Check, load and build everything for a run. world: the torchrun world (default: from the
    environment; a world of one without torchrun). Only rank 0 writes to the run directory."""
    world = world or World.from_environment()
    check_inputs(config, world.size, resume)
    precision = Precision.resolve(config.run.precision, config.run.device, world.local_rank)
    peak_memory = PeakMemory(precision.device)
    peak_memory.start()  # before any weights: the growth from here is what the memory plan predicts
    world.start(precision.device)
    if precision.device.type == "cpu":
        keep_freed_memory()
    check_trackers(config.run.report_to)
    if config.student.lora is not None:
        check_lora(config.student.lora, config.student.path, config.student.trust_remote_code)
    tokenizer = load_tokenizer(config.student.path, "student.path", config.student.trust_remote_code)
    train_prompts, eval_prompts = load_data(config, tokenizer, log)
    rows = [row for prompts in (train_prompts, eval_prompts) if prompts is not None for row in prompts.examples]
    teacher_plan = plan_teachers(config, tokenizer, rows)  # every view rendered, every server asked
    settle_forward_kl(config, resume)

    random.seed(config.run.seed)
    torch.manual_seed(config.run.seed)
    checkpoint = find_checkpoint(config, resume, log)
    student, sharded = load_student(config, precision, world)
    teacher = load_teachers(config, teacher_plan, precision, world)
    optimizer, scheduler = build_optimizer(config, student)
    stream = PromptStream(len(train_prompts), config.run.seed, config.data.shuffle)
    run = config.run
    guard = CollapseGuard(run.collapse_guard, run.collapse_entropy_fraction, run.collapse_reference,
                          run.collapse_repetition, run.collapse_patience)
    start_step, start_flops = 0, 0.0
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, student, optimizer, world)
        scheduler.load_state_dict(state["scheduler"])
        stream.consumed, start_flops, start_step = state["prompts_consumed"], state.get("flops", 0.0), state["step"]
        if state.get("guard"):
            guard.load_state_dict(state["guard"])
        log(f"resuming from {checkpoint} (step {start_step}, written by {state.get('world_size', 1)} ranks)")
    write_run_dir(config, world)

    student_sampler = ModelSampler(student, SamplingSettings.of(config.rollout), precision)
    rollout_sampler = student_sampler
    if config.rollout.engine == "vllm":  # the training rollouts; evaluation keeps opd's sampler (exact entropy)
        rollout_sampler = VLLMSampler(student, config.student.path, SamplingSettings.of(config.rollout),
                                      config.rollout.vllm, precision, seed=config.run.seed,
                                      max_model_len=config.data.max_prompt_tokens + config.rollout.max_new_tokens,
                                      trust_remote_code=config.student.trust_remote_code)
    return Session(
        output_dir=Path(config.run.output_dir), world=world, sharded=sharded, precision=precision, student=student,
        teacher=teacher, objective=build_objective(config),
        rollouts=build_rollouts(config, rollout_sampler, getattr(teacher, "loaded", None), train_prompts, precision),
        student_sampler=student_sampler,
        scored_by_sampler=sampled_by_teacher_distribution(config),
        chunk_size=tokens_per_chunk(config.loss.chunk_size, student.vocab_size),
        student_params=matmul_parameters(student.model),
        train_prompts=train_prompts, eval_prompts=eval_prompts, stream=stream,
        optimizer=optimizer, scheduler=scheduler, guard=guard, start_step=start_step, start_flops=start_flops,
        peak_memory=peak_memory,
        rewards=RewardScorer(config.reward.verifier, tokenizer) if config.reward is not None else None,
    )
