"""`--resume`: which checkpoint a run continues from, and what it may change. A resumed run must compute
what the saved steps computed, so its resolved config may differ from the one the run recorded
(resolved.yaml; config.yaml for runs from before it) only where that changes nothing the steps compute."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from opd.config.resolve import recorded_resolution, recorded_resolution_file
from opd.config.schema import Config
from opd.distributed.world import World
from opd.errors import ConfigError
from opd.io.checkpoint import check_checkpoint, checkpoint_step, latest_checkpoint

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
    # what rollout.student_fraction auto compares against, at step 0 only: a resumed run repeats its decision
    "rollout.far_reverse_kl",
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
_BEFORE_THE_KEY = {
    "rollout.max_staleness": 0,
    "loss.advantage_logprobs": "sampler",
    "teacher.top_k": 0,
    "loss.off_policy_kind": "forward_kl",
}


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


def find_checkpoint(config: Config, resume: bool | str, log=print) -> Path | None:
    """With --resume, the latest complete checkpoint, once the config is checked against the run's.
    resume: False, True (a checkpoint must be there) or "auto" (one is taken where there is one, and a
    directory without a checkpoint or a finished run starts from step 0). A finished run (final/) is
    never trained over, and a checkpoint past run.max_steps is an error: both before anything is written."""
    output_dir = Path(config.run.output_dir)
    if not resume:
        return None
    checkpoint = latest_checkpoint(output_dir)
    finished = (output_dir / "final").is_dir()
    if checkpoint is None:
        if finished:
            raise ConfigError(
                f"--resume: the run in '{output_dir}' is finished (final/) and saved no checkpoint to continue "
                f"from; to train further, start a new run from its weights (student.path={output_dir / 'final'})"
            )
        if resume == "auto":
            if (output_dir / "metrics.jsonl").exists():
                log(f"no complete checkpoint in '{output_dir}'; starting from step 0 (--resume-or-start)")
            return None
        raise ConfigError(
            f"--resume: no complete checkpoint in '{output_dir}' (run.save_every={config.run.save_every}); "
            "nothing to resume: start without --resume, or pass --resume-or-start"
        )
    step = checkpoint_step(checkpoint)
    if step > config.run.max_steps:
        raise ConfigError(
            f"--resume: the latest checkpoint ({checkpoint}) is at step {step}, past run.max_steps="
            f"{config.run.max_steps}; resume with run.max_steps of {step} or more"
        )
    check_resumable(output_dir, config)
    if step == config.run.max_steps and finished:
        raise ConfigError(
            f"--resume: the run in '{output_dir}' is finished at run.max_steps={step} (final/); raise "
            "run.max_steps to train further"
        )
    check_checkpoint(checkpoint)
    return checkpoint


def restored_in_flight(state: dict, world: World, device: torch.device, log) -> list:
    """This rank's batches that the checkpoint kept, sampled ahead of its step by weights it no longer
    has. Batches sampled by another number of ranks are not split anew: the run samples them again from
    the checkpoint's weights (same prompts, fresher weights) and says so."""
    saved = state.get("in_flight") or []
    if not any(saved):
        return []
    if len(saved) != world.size:
        log(
            f"the checkpoint's {len(saved[0])} batches sampled ahead come from {len(saved)} ranks, not {world.size}: "
            "sampling them again from its weights"
        )
        return []
    return [replace(sampled, batch=sampled.batch.to(device)) for sampled in saved[world.rank]]
