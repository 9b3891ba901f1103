"""The run's config resolved once: the validated request plus what setup learned before any weight loads.

`opd train` validates what the user asked (`Config`, frozen). Setup then reads the tokenizers, renders
every row for each teacher and asks every server; from those facts `resolve` derives the config the
run computes with, a new frozen object, and checks the one capability rule again with them. Nothing
changes a config after that. What it settles:
- `loss.forward_kl_coef` left null: 1.0 where the run can add the forward KL (exact, or from servers' top-k), else 0
  (opd.config.capabilities.forward_kl_default); on resume, the value the run recorded where it still
  applies (a run from before the default recorded 0), so a resumed run computes what it computed.
- `teacher.top_k` left null: 20 where the run reads the teachers' top-k (topk_forward_kl, or the
  forward-KL term from servers that send no hidden states), else 0.
- `loss.off_policy_kind` left null: forward_kl where the teacher gives its whole distribution, else sft
  (Config.off_policy_loss); on resume, the recorded value where it still applies.
- `loss.advantage_logprobs` left null: `sampler` at rollout.max_staleness 0 (the weights that sampled
  are the current ones), else `current` where the advantage is per token (reverse_kl_pg, discount 0,
  every teacher of the student's tokenizer), else `sampler` (docs/async.md says why).
- `rollout.student_fraction: auto`: 1.0 where the run can't mix in the teacher's samples (why_not_far);
  on resume, what the run decided at its step 0; else still `auto`, and `far_start` is the config a far
  student switches to when step 0 measures it far (opd.train.start).
It checks, with the teachers' facts (another vocabulary, a template that ends turns differently,
privileged context), that each teacher gives what the run needs. `teacher.path: student` is read
through `Config.teacher_path`, a pure function of the config.

The run folder records both: `config.yaml`, what the user asked (a run derived from it re-resolves
what it didn't set), and `resolved.yaml`, what that resolved to (what a resume must repeat).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from opd.config.capabilities import TeacherFacts, check_needs, config_facts, forward_kl_default, resolved_top_k
from opd.config.schema import Config
from opd.errors import ConfigError

REQUEST_FILE, RESOLVED_FILE = "config.yaml", "resolved.yaml"


def recorded_resolution_file(output_dir: Path) -> Path | None:
    """Where a run in `output_dir` recorded its resolved config: resolved.yaml, or for a run from before
    it existed its config.yaml (which held the resolved values then); None for no run."""
    return next(
        (Path(output_dir) / name for name in (RESOLVED_FILE, REQUEST_FILE) if (Path(output_dir) / name).is_file()), None
    )


def recorded_resolution(output_dir: Path) -> dict | None:
    """The resolved config a run in `output_dir` recorded (recorded_resolution_file), as a nested dict."""
    path = recorded_resolution_file(output_dir)
    return None if path is None else yaml.safe_load(path.read_text()) or {}


def resolve(config: Config, facts: dict[str, TeacherFacts] | None = None, recorded: dict | None = None) -> Config:
    """The config the run computes with. facts: by teacher name, from setup (default: what the config
    alone tells); recorded: the resolution of the run being resumed (recorded_resolution). Raises
    ConfigError where a teacher can't give what the run needs."""
    facts = {name: (facts or {}).get(name) or config_facts(config, name) for name in config.teacher_configs}
    config = settled_student_fraction(config, facts, recorded)
    coefficient = config.loss.forward_kl_coef
    if coefficient is None:
        default = forward_kl_default(config, facts)
        saved = ((recorded or {}).get("loss") or {}).get("forward_kl_coef")
        # A resumed run keeps what it recorded where that still applies: 0 always, the term where it can run.
        keep = isinstance(saved, (int, float)) and not isinstance(saved, bool) and (saved == 0 or default)
        coefficient = float(saved) if keep else default
    try:
        check_needs(config, facts, coefficient)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    loss = {
        "forward_kl_coef": coefficient,
        "advantage_logprobs": advantage_logprobs(config, facts),
        "off_policy_kind": off_policy_kind(config, recorded),
    }
    update: dict = {"loss": config.loss.model_copy(update=loss)}
    top_k = {name: resolved_top_k(config, name, coefficient) for name in config.teacher_configs}
    if config.teacher is not None:
        update["teacher"] = config.teacher.model_copy(update={"top_k": top_k["teacher"]})
    elif config.teachers:
        update["teachers"] = [teacher.model_copy(update={"top_k": top_k[teacher.name]}) for teacher in config.teachers]
    return config.model_copy(update=update)


def off_policy_kind(config: Config, recorded: dict | None) -> str:
    """loss.off_policy_kind as asked, or left null what it resolves to (Config.off_policy_loss); on resume,
    the value the run recorded where it still applies (a run from before null recorded forward_kl)."""
    if config.loss.off_policy_kind is not None:
        return config.loss.off_policy_kind
    saved = ((recorded or {}).get("loss") or {}).get("off_policy_kind")
    if saved == "sft" or (saved == "forward_kl" and (not config.mixed or config.off_policy_loss == "forward_kl")):
        return saved
    return config.off_policy_loss


def advantage_logprobs(config: Config, facts: dict[str, TeacherFacts]) -> str:
    """loss.advantage_logprobs as asked, or its default (see the module's docstring). Raises ConfigError
    where `current` was asked and the advantage is not per token."""
    loss = config.loss
    why_not = (
        f"loss.kind is {loss.kind}, whose loss takes no advantage"
        if loss.kind != "reverse_kl_pg"
        else f"loss.discount is {loss.discount:g}: the advantage sums later tokens' log-probs, which the update "
        "computes a chunk at a time"
        if loss.discount
        else "a teacher reads another tokenizer: its advantages are per chunk"
        if any(each.chunked for each in facts.values())
        else ""
    )
    if loss.advantage_logprobs == "current" and why_not:
        raise ConfigError(
            f"loss.advantage_logprobs: current recomputes a per-token advantage, and {why_not}; use sampler"
        )
    if loss.advantage_logprobs is not None:
        return loss.advantage_logprobs
    return "current" if config.rollout.max_staleness and not why_not else "sampler"


FAR_STUDENT_FRACTION = 0.5  # GKD's lambda a far student ramps up to (docs/far_apart.md measures it)
LAMBDA_KEYS = ("student_fraction", "student_fraction_start", "student_fraction_ramp_steps")


def on_policy(config: Config) -> Config:
    """`config` with GKD's lambda 1: what rollout.student_fraction auto settles to where it doesn't mix."""
    return config.model_copy(update={"rollout": config.rollout.model_copy(update={"student_fraction": 1.0})})


def far_start(config: Config) -> Config:
    """The request a far student runs as (`rollout.student_fraction: auto`, measured far at step 0): GKD's
    mixture with lambda rising linearly from 0 to 0.5 over the first half of run.max_steps, the other rows
    written by rollout.off_policy_source (the teacher by default, here or on its server; the data's
    answers where the user set `dataset`) and trained with loss.off_policy_kind (left null: sft where
    the teacher gives no whole distribution, a server without lm_head, else forward_kl), and
    loss.forward_kl_coef left null set to 0: the teacher's rows give the forward KL's pull, and on a
    real far pair the term on the student's own rows kept rewarding its blank lines (docs/far_apart.md).
    Validated; raises ValueError where the config can't mix."""
    rollout = {
        "student_fraction": FAR_STUDENT_FRACTION,
        "student_fraction_start": 0.0,
        "student_fraction_ramp_steps": max(1, config.run.max_steps // 2),
    }
    raw = config.model_dump()
    raw["rollout"].update(rollout)
    if raw["loss"]["forward_kl_coef"] is None:
        raw["loss"]["forward_kl_coef"] = 0.0
    return Config.model_validate(raw)


def why_not_far(config: Config, facts: dict[str, TeacherFacts]) -> str | None:
    """Why `config` could not start a far student from the teacher's samples (far_start), in one line, or
    None where it can: rollout.off_policy_source must write rows (the teacher: sample the student's
    prompts) that loss.off_policy_kind can train (forward_kl: the teacher's whole distribution), and the
    run must be distilling (not the task reward alone). Data answers are checked in setup."""
    if config.loss.kind == "reverse_kl_pg" and not config.loss.kl_coef:
        return "loss.kl_coef: 0 trains on the task reward alone"
    try:
        candidate = far_start(config)
        check_needs(candidate, facts, candidate.loss.forward_kl_coef)
    except ValidationError as exc:
        return exc.errors()[0]["msg"].removeprefix("Value error, ")
    except ValueError as exc:
        return str(exc)
    return None


def settled_student_fraction(config: Config, facts: dict[str, TeacherFacts], recorded: dict | None) -> Config:
    """`config` with rollout.student_fraction `auto` settled where it can be before any weight loads: a
    resumed run takes the lambda schedule its step 0 recorded; a run that can't mix (why_not_far) is
    on-policy (1.0). Otherwise (and for a number) unchanged."""
    rollout = config.rollout
    if rollout.student_fraction != "auto":
        return config
    saved = (recorded or {}).get("rollout") or {}
    fraction = saved.get("student_fraction")
    if isinstance(fraction, (int, float)) and not isinstance(fraction, bool):
        raw = config.model_dump()
        raw["rollout"].update({key: saved.get(key, raw["rollout"][key]) for key in LAMBDA_KEYS})
        # A far start recorded its forward-KL coefficient (and its rows' loss) beside its lambda: resolve keeps them.
        return Config.model_validate(raw)
    if why_not_far(config, facts) is not None:
        return on_policy(config)
    return config
