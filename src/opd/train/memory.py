"""Memory: the plan before launch (`opd train --dry-run CONFIG --nproc-per-node N`) and the peak measured
during a run (`memory/peak_gib`).

The plan reads each model's shapes from its config.json, builds the model on the meta device (no
weights, no network) and counts, per rank:
- resident for the whole run: the student's fp32 weights, gradients and AdamW state (two fp32
  moments), divided by the world size where the student is sharded, of the adapters alone with LoRA;
  the teacher's weights (bf16 under bf16), divided where it is sharded;
- the rollout engine's own lines (opd.rollout.engines), resident or while sampling: for opd's sampler a
  bf16 copy of the weights on a GPU (replicated student under bf16), the KV cache of the rank's share of
  one step's rollouts, the logits of a decoding step, and for a sharded student its whole weights in
  compute precision (sampling keeps every unit gathered); for vLLM its reservation, a share of the
  device's memory;
- at the peak of the update: the saved activations of one micro-batch, the loss's logit chunks, and for
  under bf16 autocast the bf16 casts of the weights saved for the backward (replicated), the teacher's
  hidden states for full-vocabulary losses, and for a sharded student its root and two layers
  gathered and the root's full-size gradients;
- in AdamW's step: one fp32 temporary the size of the trained parameters;
- at the peak of teacher scoring: its logit chunks and activations, and for a sharded teacher its
  root (embeddings and LM head) and a layer, gathered.
- while a teacher in this process writes rollouts (`rollout.source: teacher`, GKD's mixture with the
  teacher's samples, or `rollout.student_fraction: auto` where step 0 may start far): the KV cache and a
  decoding step's logits of the rank's whole share of a step's rollouts (lambda 0 at a far start).
The peak is the resident part plus the largest phase. Not counted: allocator caches and communication
buffers. Activation sizes are an estimate for
decoder layers with a gated MLP (about 10 hidden-size and 4 MLP-size values per token and layer).

Measured: on a GPU the allocator's peak (`torch.cuda.max_memory_allocated`); on a CPU the growth of the
process's peak resident memory since setup began (imports and the interpreter left out).
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from opd.config.capabilities import FULL_DISTRIBUTION, config_facts, needed
from opd.config.resolve import why_not_far
from opd.config.schema import Config
from opd.models.shapes import model_shape
from opd.ops.logprobs import tokens_per_chunk
from opd.rollout.engines import ENGINES
from opd.rollout.sampler import OPD_ENGINE, EngineMemoryInputs

GIB = 2**30


@dataclass
class MemoryPlan:
    """Bytes per rank: what stays resident, and what each phase of a step adds (sampling, teacher
    scoring, the update); `peak` is resident + the largest phase."""

    resident: dict[str, float]
    phases: dict[str, dict[str, float]]
    notes: list[str]

    @property
    def peak(self) -> float:
        return sum(self.resident.values()) + max((sum(items.values()) for items in self.phases.values()), default=0)

    def lines(self, world_size: int) -> list[str]:
        if not self.resident:
            return ["memory plan: none", *[f"  note: {note}" for note in self.notes]]
        lines = [f"memory plan per rank ({world_size} rank{'s' if world_size > 1 else ''}):"]
        for title, items in {
            "resident": self.resident,
            **{f"while {name}": items for name, items in self.phases.items()},
        }.items():
            lines.append(f"  {title + ':':<46}{_gib(sum(items.values()))}")
            lines += [f"    {name:<44}{_gib(value)}" for name, value in items.items()]
        lines.append(f"  {'peak (resident + the largest phase):':<46}{_gib(self.peak)}")
        return lines + [f"  note: {note}" for note in self.notes]


def _gib(value: float) -> str:
    return f"{value / GIB:8.3f} GiB"


def device_memory(device: str) -> float | None:
    """Bytes of memory of the device (cuda: the first GPU; cpu: the host's), where this machine can tell."""
    if device == "cuda":
        return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def plan_memory(config: Config, world_size: int, device: str = "cuda") -> MemoryPlan:
    """The plan for `config` on `world_size` ranks of `device` (cuda: bf16 where run.precision allows).
    config: as validated (a null forward-KL weight is planned at the default the config alone implies)
    or resolved."""
    notes: list[str] = []
    full_distribution = FULL_DISTRIBUTION in needed(config)
    student = model_shape(config.student.path, config.student.trust_remote_code, config.student.lora)
    # The largest teacher in this process (several teachers: each adds its weights below); a server's is its own.
    local = [(name, settings) for name, settings in config.teacher_configs.items() if not settings.remote]
    shapes = [model_shape(config.teacher_path(name), settings.trust_remote_code) for name, settings in local]
    planned = [shape for shape in shapes if not isinstance(shape, str)]
    teacher = max(planned, key=lambda shape: shape.parameters) if planned else next(iter(shapes), None)
    # A served teacher whose LM head is held here (lm_head): the head alone, and the loss's hidden states.
    heads = [
        model_shape(settings.lm_head, settings.trust_remote_code)
        for settings in config.teacher_configs.values()
        if settings.remote and settings.lm_head is not None
    ]
    for key, shape in (
        ("student.path", student),
        *(("teacher.path", shape) for shape in shapes),
        *(("teacher.lm_head", shape) for shape in heads),
    ):
        if isinstance(shape, str):
            notes.append(f"{key}: {shape}")
    heads = [shape for shape in heads if not isinstance(shape, str)]
    if isinstance(student, str):
        return MemoryPlan({}, {}, notes)
    bf16 = config.run.precision == "bf16" or (config.run.precision == "auto" and device == "cuda")
    compute_bytes = 2 if bf16 else 4
    sharded = config.student.shard and world_size > 1
    split = world_size if sharded else 1
    trainable = student.lora_parameters if student.lora_parameters is not None else student.parameters
    resident = {
        f"student weights (fp32{', sharded' if sharded else ''})": 4 * student.parameters / split,
        f"student gradients (fp32{', sharded' if sharded else ''})": 4 * trainable / split,
        f"AdamW state (2 x fp32{', sharded' if sharded else ''})": 8 * trainable / split,
    }
    teacher_sharded = bool(config.teacher and config.teacher.shard and world_size > 1)
    for index, shape in enumerate(planned):
        name = "teacher" if len(planned) == 1 else f"teacher {index + 1}"
        resident[f"{name} weights ({'bf16' if bf16 else 'fp32'}{', sharded' if teacher_sharded else ''})"] = (
            compute_bytes * shape.parameters / (world_size if teacher_sharded else 1)
        )

    for index, shape in enumerate(heads):
        name = "teacher LM head" if len(heads) == 1 else f"teacher LM head {index + 1}"
        resident[f"{name} ({'bf16' if bf16 else 'fp32'}; its body is on a server)"] = (
            compute_bytes * shape.vocab * shape.hidden
        )
    rollout, data = config.rollout, config.data
    rows = config.batch.prompts_per_step // world_size * rollout.samples_per_prompt
    sequence = data.max_prompt_tokens + rollout.max_new_tokens
    micro = config.batch.micro_batch_size
    engine = ENGINES[config.rollout.engine].memory(
        EngineMemoryInputs(
            config,
            student,
            device,
            rows,
            sequence,
            bf16 and device == "cuda",
            compute_bytes,
            sharded,
            device_memory(device),
        )
    )
    resident.update(engine.resident)
    notes.extend(engine.notes)
    sampling = engine.sampling
    # A chunk holds at most the completion tokens of a micro-batch (of a step's rollouts, for the teacher).
    chunk = min(tokens_per_chunk(config.loss.chunk_size, student.vocab), micro * rollout.max_new_tokens)
    blocks = 6 if full_distribution else 4
    # Saved for the backward, per position and layer: the inputs of the attention's and the MLP's
    # products, queries, keys, values and attention output, the gated MLP's four intermediate-size
    # values (in compute precision), and the two norms' inputs on the fp32 residual stream.
    per_token_layer = (
        compute_bytes * (2 * student.hidden + 2 * student.query_width + 2 * student.kv_width + 4 * student.mlp)
        + 4 * 2 * student.hidden
    )
    # Each prompt's hidden states are computed once for all its samples in the micro-batch.
    positions = -(-micro // rollout.samples_per_prompt) * data.max_prompt_tokens + micro * rollout.max_new_tokens
    update = {
        f"activations of {micro} rollouts ({positions} positions)": positions * student.layers * per_token_layer,
        f"logit chunks ({blocks} x {chunk} tokens x {student.vocab})": blocks * chunk * student.vocab * 4,
    }
    if bf16 and not sharded:  # autocast's bf16 copy of each weight, saved for the input gradients
        update["bf16 weight casts kept for the backward"] = 2 * student.parameters
    widest = max([*planned, *heads], key=lambda shape: shape.hidden, default=None)
    if widest is not None and full_distribution:
        # With rollout.max_staleness N, the batches scored ahead keep theirs too: N + 1 at most.
        kept = 1 + rollout.max_staleness
        update[f"teacher hidden states kept for the loss ({kept} batch{'es' if kept > 1 else ''})"] = (
            kept * rows * rollout.max_new_tokens * widest.hidden * compute_bytes
        )
    if sharded:
        # Full-size root gradients (compute precision, then fp32 for the reduce-scatter) before they shard.
        update["root gradients before the reduce-scatter"] = (compute_bytes + 4) * student.root
        # The root (embeddings, norm, LM head) stays gathered for the whole loss; a layer and the next prefetched.
        update["root and two layers, gathered"] = compute_bytes * (student.root + 2 * student.largest_layer)
    # AdamW's foreach step holds one moment-sized temporary (the denominator) over all its parameters.
    phases = {
        **({"sampling": sampling} if sampling else {}),
        "updating": update,
        "the optimizer step": {"AdamW temporaries (fp32)": 4 * trainable / split},
    }
    if teacher is not None and not isinstance(teacher, str):
        teacher_chunk = min(tokens_per_chunk(config.loss.chunk_size, teacher.vocab), rows * rollout.max_new_tokens)
        scoring = {
            "teacher logit chunks": 2 * teacher_chunk * teacher.vocab * 4,
            "teacher activations of one layer": 2 * rows * sequence * (teacher.hidden + teacher.mlp) * 4,
        }
        if teacher_sharded:
            scoring["teacher root and a layer, gathered"] = compute_bytes * (teacher.root + teacher.largest_layer)
        if rollout.max_staleness and not teacher_sharded:  # the scoring thread scores while the update runs
            phases["updating"] = {**update, **{f"{name} (scoring meanwhile)": value for name, value in scoring.items()}}
        else:
            phases["scoring"] = scoring
    writes = teacher_writes(config)
    if writes and teacher is not None and not isinstance(teacher, str):
        # The teacher samples with opd's sampler: the same lines as the student's, for the teacher's shape.
        inputs = EngineMemoryInputs(  # a sharded teacher samples gathered whole, like a sharded student
            config, teacher, device, rows, sequence, bf16 and device == "cuda", compute_bytes, teacher_sharded, None
        )
        lines = OPD_ENGINE.memory(inputs).sampling.items()
        phases["the teacher writing rollouts"] = {name.replace("student", "teacher"): value for name, value in lines}
        notes.append(f"the teacher writes rollouts ({writes}): planned for the rank's whole share of a step")
    if heads and (teacher is None or isinstance(teacher, str)):  # the heads' logits, chunk by chunk
        head = max(heads, key=lambda shape: shape.vocab)
        head_chunk = min(tokens_per_chunk(config.loss.chunk_size, head.vocab), rows * rollout.max_new_tokens)
        phases["scoring"] = {"teacher logit chunks (its head here)": 2 * head_chunk * head.vocab * 4}
    return MemoryPlan(resident, phases, notes)


def teacher_writes(config: Config) -> str | None:
    """Why a teacher in this process may sample some of a step's rollouts, in a few words, or None."""
    rollout = config.rollout
    if rollout.source == "teacher":
        return "rollout.source: teacher"
    if rollout.off_policy_source != "teacher":
        return None
    if config.mixed:
        return "GKD's mixture, rollout.off_policy_source: teacher"
    if rollout.student_fraction == "auto" and config.teacher is not None:
        facts = {name: config_facts(config, name) for name in config.teacher_configs}
        if why_not_far(config, facts) is None:
            return "rollout.student_fraction auto, if step 0 measures the student far"
    return None


class PeakMemory:
    """The peak memory of this process since `start()`: tensors on a GPU, resident growth on a CPU.

    On a CPU the peak is the kernel's high-water mark of resident memory (VmHWM), reset at `start()`
    where Linux allows it. Not getrusage's ru_maxrss: Linux carries that over from the parent through
    fork and exec, so a run started by a large process (a notebook, a test session holding a vLLM
    engine) would report the parent's size."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # "5" resets this process's peak resident size to its current one (Linux 4.0+)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # then the peak may include what loading took before start()
        self.baseline = _resident_bytes()

    def bytes(self) -> float:
        if self.device.type == "cuda":
            return float(torch.cuda.max_memory_allocated(self.device))
        return float(max(0, _peak_resident_bytes() - self.baseline))


def _resident_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):  # not Linux: no baseline
        return 0
    return pages * resource.getpagesize()


def _peak_resident_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # in kB
    except (OSError, IndexError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: bytes on macOS, kB elsewhere
    return peak if sys.platform == "darwin" else peak * 1024
