"""What `--resume` may change: a resumed run must compute what the saved steps computed, so its resolved
config may differ from the one the run recorded (resolved.yaml; config.yaml for runs from before it)
only where that changes nothing the steps compute."""

from __future__ import annotations

from pathlib import Path

from opd.config.resolve import recorded_resolution, recorded_resolution_file
from opd.config.schema import Config
from opd.errors import ConfigError

# Keys that may change between a run and its resumption: they don't change what the steps compute
# (sharding changes the layout only; DCP checkpoints load into either).
_RESUMABLE_CHANGES = {
    "run.max_steps",
    "run.save_every",
    "run.keep_checkpoints",
    "run.eval_every",
    "run.log_every",
    "run.progress",
    "run.report_to",
    "run.wandb_project",
    "student.shard",
    "teacher.shard",
    # where and how a teacher on a server is reached (it must serve the same model)
    "teacher.url",
    "teacher.api_key_env",
    "teacher.timeout_s",
    "teacher.concurrency",
    "teacher.request_tokens",
    "teacher.retry_deadline_s",
}


# Keys added since runs were first recorded, with the value that reproduces what a run recorded before
# them computed.
# teacher.top_k was 0 by default before it could be left null (a resolved run records its value).
_BEFORE_THE_KEY = {"rollout.max_staleness": 0, "loss.advantage_logprobs": "sampler", "teacher.top_k": 0}


def check_resumable(output_dir: Path, config: Config) -> None:
    """Refuse to resume with settings that would make the saved state mean something else. config: the
    resolved config of the resumed run."""
    saved_path = recorded_resolution_file(output_dir)
    if saved_path is None:
        return
    saved_config = recorded_resolution(output_dir)
    saved, current = _flatten(saved_config), _flatten(config.model_dump(mode="json"))
    for key, value in _BEFORE_THE_KEY.items():  # a run recorded before the key (or its resolution) computed this
        if saved.get(key) is None and key in current:  # teacher.top_k only where the run has one `teacher:`
            saved[key] = value
    # The cosine horizon is what the schedule depends on: max_steps may grow, decay_steps may name the
    # old horizon, as long as the effective horizon stays the same.
    for flat, horizon in ((saved, _saved_horizon(saved)), (current, config.decay_steps)):
        flat["optim.decay_steps"] = horizon if flat.get("optim.schedule") == "cosine" else None
    changed = sorted(
        key
        for key in saved.keys() | current.keys()
        if saved.get(key) != current.get(key) and key not in _RESUMABLE_CHANGES
    )
    if "optim.decay_steps" in changed:
        raise ConfigError(
            f"--resume: run.max_steps {saved.get('run.max_steps')} -> {config.run.max_steps} would stretch the cosine "
            f"schedule that the saved steps followed; keep it with --set optim.decay_steps={saved['optim.decay_steps']}"
        )
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed)
        raise ConfigError(
            f"--resume: the config differs from the run's {saved_path} in {details}; "
            f"only {', '.join(sorted(_RESUMABLE_CHANGES))} may change"
        )


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
