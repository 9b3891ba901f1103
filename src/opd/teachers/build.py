"""The run's teachers from its config, in two steps around the student's loading: `plan_teachers` checks
everything that needs no weights (each teacher's view of its rows, every server), `load_teachers`
loads the local ones and puts each view in front of its scorer."""

from __future__ import annotations

from dataclasses import dataclass

from opd.config.schema import Config
from opd.config.sections import FULL_DISTRIBUTION, TOP_K
from opd.distributed.sharding import shard_model
from opd.distributed.world import World
from opd.errors import ConfigError
from opd.models.loading import check_context, load_tokenizer, stop_token_ids
from opd.models.precision import Precision
from opd.teachers.base import TokenScorer
from opd.teachers.local import load_teacher
from opd.teachers.remote import RemoteTeacher
from opd.teachers.routed import RoutedTeachers, route
from opd.teachers.view import TeacherView, ViewedTeacher, ViewSettings


@dataclass
class TeacherPlan:
    """The teachers as far as they are known before any weight loads, by name."""

    views: dict[str, TeacherView | None]  # None: the teacher reads its rows as the student does
    servers: dict[str, RemoteTeacher]  # asked already: they answer, serve the model, share the tokenizer


def build_view(config: Config, name: str, student_tokenizer, examples: list) -> TeacherView | None:
    """The teacher's own view of its rows `examples` (opd.teachers.view), or None where it reads them as
    the student does: one vocabulary, the student's template, no privileged context. Every row is
    rendered now, so a row the teacher can't render fails before any weight loads."""
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
    if view.chunked and config.loss.forward_kl_coef is None:  # (the default is off with chat_template own already)
        config.loss.forward_kl_coef = 0.0  # the default's forward KL compares one vocabulary's distributions
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
    view.teacher_prompts(examples)
    return view


def plan_teachers(config: Config, student_tokenizer, rows: list) -> TeacherPlan:
    """Each teacher's view of the rows routed to it (`rows`: every training and evaluation row), and its
    server asked whether it can serve them."""
    names = list(config.teacher_configs)
    views = {name: build_view(config, name, student_tokenizer, [row for row in rows if route(row, names) == name])
             for name in names}
    servers = {}
    for name, settings in config.teacher_configs.items():
        if settings.remote:
            teacher_tokenizer = views[name].teacher_tokenizer if views[name] else student_tokenizer
            servers[name] = RemoteTeacher(settings, len(teacher_tokenizer))
            servers[name].check(teacher_tokenizer)
    return TeacherPlan(views, servers)


def load_teachers(config: Config, plan: TeacherPlan, precision: Precision, world: World) -> TokenScorer | None:
    """The run's teacher: the one teacher, RoutedTeachers over several, or None (SFT on the data's answers).
    Local teachers load here, in bf16 under bf16, sharded where `shard` asks it under torchrun."""
    scorers: dict[str, TokenScorer] = {}
    for name, settings in config.teacher_configs.items():
        if settings.remote:
            scorers[name] = plan.servers[name]
            continue
        key = f"{config.teacher_key(name)}.path"
        local = load_teacher(settings.path, key, precision, settings.temperature, config.loss.chunk_size,
                             settings.trust_remote_code, settings.top_k)
        check_context(local.model, config.data.max_prompt_tokens + config.rollout.max_new_tokens,
                      "data.max_prompt_tokens + rollout.max_new_tokens", key)
        if settings.shard and world.size > 1:
            shard_model(local.model, precision.device)  # in its own dtype: bf16 under bf16, no optimizer
        scorers[name] = local
    scorers = {name: ViewedTeacher(scorer, plan.views[name]) if plan.views[name] else scorer
               for name, scorer in scorers.items()}
    return RoutedTeachers(scorers) if config.teachers else next(iter(scorers.values()), None)
