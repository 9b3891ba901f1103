"""The run's teachers from its config, in three steps around the student's loading: `plan_views` reads
each teacher's tokenizer and renders its view of its rows (no weights), which tells setup the teachers'
facts (opd.config.capabilities.TeacherFacts) for resolving the config; `probe_servers` asks every
server whether it can serve the rows; `load_teachers` loads the local ones and puts each view in front
of its scorer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.config.capabilities import TeacherFacts, config_facts
from opd.config.schema import Config
from opd.distributed.sharding import shard_model
from opd.distributed.world import World
from opd.errors import ConfigError
from opd.models.lm_head import load_lm_head
from opd.models.loading import LoadedModel, load_tokenizer, stop_token_ids
from opd.models.precision import Precision
from opd.ops.logprobs import tokens_per_chunk
from opd.teachers.base import TokenScorer
from opd.teachers.hidden_states import HiddenStateTeacher
from opd.teachers.local import LocalTeacher, load_teacher
from opd.teachers.remote import RemoteTeacher
from opd.teachers.routed import RoutedTeachers, route
from opd.teachers.view import TeacherView, ViewedTeacher, ViewSettings


@dataclass
class TeacherPlan:
    """The teachers as far as they are known before any weight loads, by name."""

    views: dict[str, TeacherView | None]  # None: the teacher reads its rows as the student does
    facts: dict[str, TeacherFacts]  # what the views tell of each teacher, for resolving the config
    servers: dict[str, RemoteTeacher]  # filled by probe_servers: they answer, serve the model, share the tokenizer


@dataclass
class Teachers:
    """The run's teachers once loaded: what scores a step, and the local model that can write rollouts."""

    scorer: TokenScorer | None  # the one teacher, RoutedTeachers over several, or None (SFT on the data's answers)
    # What can sample rollouts: the one local teacher's model, or the one teacher's server; None otherwise.
    writer: LoadedModel | RemoteTeacher | None
    sharded: bool  # some teacher is sharded with FSDP2: every rank must call it equally often


def build_view(config: Config, name: str, student_tokenizer, examples: list) -> tuple[TeacherView | None, TeacherFacts]:
    """The teacher's own view of its rows `examples` (opd.teachers.view), or None where it reads them as
    the student does (one vocabulary, the student's template, no privileged context); and what the view
    tells of the teacher. Every row is rendered now, so a row the teacher can't render fails before any
    weight loads."""
    settings, key = config.teacher_configs[name], config.teacher_key(name)
    source = settings.tokenizer or (None if settings.remote else config.teacher_path(name))
    teacher_tokenizer = (
        student_tokenizer
        if source is None
        else load_tokenizer(
            source, f"{key}.tokenizer" if settings.tokenizer else f"{key}.path", settings.trust_remote_code
        )
    )
    data = config.data
    teacher_system = data.system_prompt if data.teacher_system_prompt is None else data.teacher_system_prompt
    view_settings = ViewSettings(
        settings.chat_template,
        teacher_system or None,
        data.teacher_context_format,
        data.chat_template_kwargs,
        settings.alignment,
        student_system_prompt=data.system_prompt,
    )
    try:
        view = TeacherView(
            student_tokenizer, teacher_tokenizer, stop_token_ids(config.student.path, student_tokenizer), view_settings
        )
    except ValueError as exc:
        raise ConfigError(f"{key}.alignment: {exc}") from None
    needed = view.needed(examples)
    known = config_facts(config, name)
    facts = TeacherFacts(
        chunked=view.chunked, ends_turns_differently=view.ends_turns_differently, own_view=known.own_view or needed
    )
    if not needed:
        return None, facts
    view.teacher_prompts(examples)
    return view, facts


def plan_views(config: Config, student_tokenizer, rows: list) -> TeacherPlan:
    """Each teacher's view of the rows routed to it (`rows`: every training and evaluation row)."""
    names = list(config.teacher_configs)
    built = {
        name: build_view(config, name, student_tokenizer, [row for row in rows if route(row, names) == name])
        for name in names
    }
    return TeacherPlan(
        {name: view for name, (view, _) in built.items()}, {name: facts for name, (_, facts) in built.items()}, {}
    )


def probe_servers(config: Config, plan: TeacherPlan, student_tokenizer) -> None:
    """Ask each teacher's server whether it can serve the run (plan.servers gets them)."""
    for name, settings in config.teacher_configs.items():
        if settings.remote:
            view = plan.views[name]
            teacher_tokenizer = view.teacher_tokenizer if view else student_tokenizer
            plan.servers[name] = RemoteTeacher(settings, len(teacher_tokenizer), config.teacher_key(name))
            plan.servers[name].check(teacher_tokenizer)


def load_teachers(config: Config, plan: TeacherPlan, precision: Precision, world: World) -> Teachers:
    """The run's teachers: local ones load here, in bf16 under bf16, sharded where `shard` asks it under
    torchrun; each view goes in front of its scorer; several teachers are routed (RoutedTeachers)."""
    scorers: dict[str, TokenScorer] = {}
    locals_: dict[str, LocalTeacher] = {}
    sharded = False
    for name, settings in config.teacher_configs.items():
        if settings.remote:
            scorers[name] = with_head(config, name, plan.servers[name], precision)
            continue
        key = f"{config.teacher_key(name)}.path"
        local = load_teacher(
            config.teacher_path(name),
            key,
            precision,
            settings.temperature,
            config.loss.chunk_size,
            settings.trust_remote_code,
            settings.top_k or 0,
        )
        if settings.shard and world.size > 1:
            shard_model(local.model, precision.device)  # in its own dtype: bf16 under bf16, no optimizer
            sharded = True
        scorers[name] = locals_[name] = local
    scorers = {
        name: ViewedTeacher(scorer, plan.views[name], locals_[name].model if name in locals_ else None)
        if plan.views[name]
        else scorer
        for name, scorer in scorers.items()
    }
    scorer = RoutedTeachers(scorers, parallel=not sharded) if config.teachers else next(iter(scorers.values()), None)
    writer = None
    if config.teacher is not None:
        writer = locals_["teacher"].loaded if "teacher" in locals_ else plan.servers.get("teacher")
    return Teachers(scorer, writer, sharded)


def with_head(config: Config, name: str, server: RemoteTeacher, precision: Precision) -> TokenScorer:
    """A served teacher with lm_head: its LM head loaded here (alone, in bf16 under bf16), the server asked
    for hidden states, and the head checked against the served model's; without lm_head, the server as it is."""
    settings = config.teacher_configs[name]
    if settings.lm_head is None:
        return server
    key = f"{config.teacher_key(name)}.lm_head"
    head = load_lm_head(
        settings.lm_head, key, precision.device, precision.frozen_weights_dtype, settings.trust_remote_code
    )
    wire = (
        settings.hidden_dtype
        if settings.hidden_dtype != "auto"
        else ("bf16" if precision.autocast_dtype == torch.bfloat16 else "fp32")
    )
    chunk_size = tokens_per_chunk(config.loss.chunk_size, server.vocab_size)
    teacher = HiddenStateTeacher(server, head, server.vocab_size, precision, chunk_size, wire)
    teacher.check(server.tokenizer)
    return teacher


def on_servers(scorer: TokenScorer | None) -> bool:
    """Every teacher behind `scorer` is on a server: what it scores doesn't depend on how this process
    groups rows into calls (a server batches requests its own way anyway)."""
    if isinstance(scorer, RoutedTeachers):
        return all(on_servers(each) for each in scorer.scorers.values())
    if isinstance(scorer, ViewedTeacher):
        return on_servers(scorer.scorer)
    return isinstance(scorer, (RemoteTeacher, HiddenStateTeacher))
