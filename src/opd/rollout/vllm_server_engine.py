"""The student's rollouts from `vllm serve` processes on devices of their own (`rollout.engine: vllm_server`).

Each server is started apart from the trainer (`opd serve-student`, or `vllm serve` with the flags it
passes) and given by URL in `rollout.vllm_server.urls`. Before every rollout the trainer pushes the
student's current weights to every server through vLLM's weight-transfer protocol
(opd.rollout.weight_transfer), labelled with their policy version; then each of the step's prompts
goes to one server (by its key, so the spread does not depend on the world size) through vLLM's
token-in, token-out route `/inference/v1/generate`: its token ids, `n` samples, the run's temperature,
top-k and top-p, the prompt's own seed, and each sampled token's log-probability under the
distribution that drew it (the server runs with `--logprobs-mode processed_logprobs`), which is ℓˢ.

Every completion comes back stamped with the weight version the server sampled it with, and a batch
whose stamps are not the version pushed is never used: the server restarted (its weights are its
checkpoint's again) or another client changed them. The sampler raises `ServerRestarted` then, and the
pipeline has the weights pushed again and the prompts sampled again (opd.train.pipeline).

Sampling makes no collective call and needs none of the trainer's devices, so with
rollout.max_staleness >= 1 it runs on a thread of its own while the trainer updates.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch

from opd.config.schema import Config
from opd.config.sections import VLLMServerSettings
from opd.data.prompts import PromptBatch
from opd.distributed.sharding import is_sharded
from opd.distributed.world import World
from opd.errors import ConfigError
from opd.models.loading import LoadedModel
from opd.models.precision import Precision
from opd.models.weights import engine_weight_units
from opd.ops.batch import STUDENT, StepBatch
from opd.ops.flops import forward_flops, matmul_parameters
from opd.rollout.sampler import (
    EngineMemory,
    EngineMemoryInputs,
    GroupsDone,
    RolloutEngine,
    SamplingSettings,
    listed_completions_batch,
    stream_seed,
)
from opd.rollout.weight_transfer import (
    GLOO_BACKEND,
    RolloutServer,
    RolloutServerError,
    ServerUnreachable,
    WeightPush,
    api_key,
)

NEVER_ANSWERED_GRACE_S = 5.0
PUSH_ATTEMPTS = 3  # pushes in a row that may lose a server (each waits for it to come back)
GENERATE = "/inference/v1/generate"


class ServerRestarted(RolloutServerError):
    """A server's completions were not sampled with the weights pushed to it (it restarted, most likely)."""


class ServerSampler:
    """Samples the student on rollout servers; implements opd.rollout.sampler.Sampler (see the module)."""

    source = STUDENT
    gives_entropy = False  # the servers return the sampled tokens' log-probs only: the update computes it
    streams = True  # sample() takes on_groups: a prompt's samples are handed over as its answer arrives
    samples_elsewhere = True  # no device or collective of the trainer's: it may sample beside the update

    def __init__(
        self,
        policy: LoadedModel,
        settings: SamplingSettings,
        servers: VLLMServerSettings,
        dtype: torch.dtype,
        max_model_len: int,
        world: World,
    ):
        self.policy, self.settings, self.config, self.dtype, self.world = policy, settings, servers, dtype, world
        key = api_key(servers.api_key, servers.api_key_env)
        self.servers = [RolloutServer(url, key, servers.timeout_s) for url in servers.urls]
        backend = servers.weight_transfer
        if backend == "auto":
            backend = "nccl" if next(policy.model.parameters()).is_cuda else GLOO_BACKEND
        self.backend = backend
        self.push = WeightPush(backend, servers.transfer_address, servers.timeout_s, is_sender=world.rank == 0)
        self.pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="opd-rollout-server")
        self.version: int | None = None  # what the servers hold, once pushed
        self.last_push_bytes = 0
        rows = policy.model.get_output_embeddings().weight.shape[0]
        self._allowed = list(range(policy.vocab_size)) if rows > policy.vocab_size else None
        self._matmul_parameters = matmul_parameters(policy.model)
        for server in self.servers:  # every rank samples, so every rank checks what it will talk to
            self._check(server, max_model_len)
        if world.rank == 0:
            for server in self.servers:
                self.push.connect(server)

    # --- start-up -------------------------------------------------------------------------------

    def _check(self, server: RolloutServer, max_model_len: int) -> None:
        """The server answers, runs with the RL routes, the log-probs opd needs, the weight-transfer
        backend chosen here and a context that holds a rollout. One-line ConfigError otherwise."""
        info = self._when_up(server, lambda: server.call("GET", "/server_info", params={"config_format": "json"}))
        config = info.get("vllm_config", {}) if isinstance(info, dict) else {}
        model, parallel = config.get("model_config") or {}, config.get("parallel_config") or {}
        transfer = (config.get("weight_transfer_config") or {}).get("backend")
        launch = "start it with `opd serve-student` (docs/rollout_engine.md)"
        if model.get("logprobs_mode") != "processed_logprobs":
            raise ConfigError(
                f"rollout.vllm_server.urls: {server.url} returns {model.get('logprobs_mode')} log-probs, not "
                f"those of the distribution that drew each token (--logprobs-mode processed_logprobs); {launch}"
            )
        if transfer != self.backend:
            raise ConfigError(
                f"rollout.vllm_server.urls: {server.url} takes weights over {transfer or 'no backend'}, and this "
                f"run sends them over {self.backend} (rollout.vllm_server.weight_transfer); {launch}"
            )
        if (model.get("max_model_len") or 0) < max_model_len:
            raise ConfigError(
                f"rollout.vllm_server.urls: {server.url} holds {model.get('max_model_len')} tokens of context, "
                f"and a rollout takes up to {max_model_len} (data.max_prompt_tokens + rollout.max_new_tokens)"
            )
        server.workers = max(1, int(parallel.get("world_size", 1))) * max(1, int(parallel.get("data_parallel_size", 1)))

    def _when_up(self, server: RolloutServer, call):
        """call(), through a restart of the server: retried while it is unreachable, for
        retry_deadline_s where it answered before, NEVER_ANSWERED_GRACE_S where it never did."""
        started, attempt = time.monotonic(), 0
        while True:
            try:
                answer = call()
                server.answered = True
                return answer
            except ServerUnreachable as exc:
                answered = server.answered
                deadline = self.config.retry_deadline_s if answered else NEVER_ANSWERED_GRACE_S
                if time.monotonic() - started >= deadline:
                    raise RolloutServerError(
                        f"rollout server {server.url} did not answer for {time.monotonic() - started:.0f} s "
                        f"({'rollout.vllm_server.retry_deadline_s' if answered else 'it never answered'}): {exc}"
                    ) from None
                time.sleep(min(5.0, 0.2 * 2**attempt) * (0.5 + random.random() / 2))
                attempt += 1

    # --- weights --------------------------------------------------------------------------------

    def sync_weights(self, version: int) -> float | None:
        """Push the current weights to every server that does not hold `version` (all of them after an
        update; one that restarted after a fault), labelled with it. A server lost during the push (a
        restart) is waited for and pushed to again. Every rank calls it together (a sharded student's
        gathers are collectives) and every rank raises a failure rank 0 met. Returns the seconds it
        took, None if nothing was sent."""
        started, pushed = time.perf_counter(), False
        self.version = version
        for _ in range(PUSH_ATTEMPTS):
            targets, outcome = [], None
            if self.world.rank == 0:
                try:
                    targets = self._servers_without(version)
                    outcome = ("push", "") if targets else None
                except RolloutServerError as exc:
                    outcome = ("failed", str(exc))
            outcome = self._from_rank_0(outcome)
            if outcome is None:
                break
            if outcome[0] == "failed":
                raise RolloutServerError(outcome[1])
            units = engine_weight_units(self.policy.model, self.dtype)
            if self.world.rank != 0 and not is_sharded(self.policy.model):
                units = iter(())  # nothing of this rank's is needed: no gathers to take part in
            outcome = None
            try:
                self.push.push(units, version, targets)
                self.last_push_bytes, pushed = self.push.bytes_sent, True
            except ServerUnreachable as exc:  # restarting: the next round waits for it and connects again
                outcome = ("again", str(exc))
            except RolloutServerError as exc:
                outcome = ("failed", str(exc))
            outcome = self._from_rank_0(outcome)
            if outcome is None:
                break
            if outcome[0] == "failed":
                raise RolloutServerError(outcome[1])
        else:
            raise RolloutServerError(f"{outcome[1]} ({PUSH_ATTEMPTS} pushes in a row lost a server)")
        if self.world.size > 1:
            self.world.barrier()  # no rank samples before the servers resumed with the new weights
        return time.perf_counter() - started if pushed else None

    def _servers_without(self, version: int) -> list[RolloutServer]:
        """Rank 0: the servers to push `version` to, each answering and connected (waited for through a
        restart; connected again after one)."""
        targets = []
        for server in self.servers:
            held = self._when_up(server, lambda: server.call("GET", "/weight_info")).get("weight_version")
            if server.version is not None and held != str(server.version):  # restarted: its weights and
                server.version, server.group = None, None  # its end of the group are gone
            if server.group is None:
                self._when_up(server, lambda: self.push.connect(server))
            if server.version != version:
                targets.append(server)
        return targets

    def _from_rank_0(self, value):
        """Rank 0's value on every rank (a collective where there are several)."""
        return self.world.gather(value)[0] if self.world.size > 1 else value

    # --- sampling -------------------------------------------------------------------------------

    def sampling_flops(self, batch: StepBatch) -> float:
        return forward_flops(self._matmul_parameters, batch)

    def sample(
        self, prompts: PromptBatch, samples_per_prompt: int, seed: int, on_groups: GroupsDone | None = None
    ) -> StepBatch:
        """The prompts' samples from the servers, with the weights of the last sync_weights. seed: the run's
        sampling seed; with each prompt's key it fixes that prompt's draws. on_groups: called with each
        prompt's rows as its answer arrives. Raises ServerRestarted where a server's answer was sampled
        with other weights."""
        if self.version is None:
            raise RuntimeError("sync_weights must come before the first sample")
        calls = {
            self.pool.submit(self._generate, self._server_of(key), ids, samples_per_prompt, seed, key): index
            for index, (ids, key) in enumerate(zip(prompts.token_ids, prompts.keys))
        }
        answers: list[list[tuple[list[int], list[float]]]] = [[] for _ in prompts.token_ids]
        pad_id, stops, device = self.policy.tokenizer.pad_token_id, self.policy.stop_token_ids, self._device()
        try:
            for call in as_completed(calls):
                index = calls[call]
                answers[index] = call.result()
                if on_groups is not None:
                    rows = [index * samples_per_prompt + sample for sample in range(samples_per_prompt)]
                    part = listed_completions_batch(
                        prompts.pick([index]), samples_per_prompt, answers[index], pad_id, stops, device
                    )
                    on_groups(rows, part)
        finally:
            for call in calls:
                call.cancel()
        samples = [sample for answer in answers for sample in answer]
        return listed_completions_batch(prompts, samples_per_prompt, samples, pad_id, stops, device)

    def _server_of(self, key: int) -> RolloutServer:
        return self.servers[key % len(self.servers)]

    def _device(self) -> torch.device:
        return next(self.policy.model.parameters()).device

    def _generate(
        self, server: RolloutServer, ids: list[int], samples: int, seed: int, key: int
    ) -> list[tuple[list[int], list[float]]]:
        """One prompt's samples, in their index order: (token ids, their log-probs) each."""
        settings = self.settings
        body = {
            "token_ids": list(ids),
            "sampling_params": {
                "n": samples,
                "temperature": settings.temperature,
                "top_k": settings.top_k or -1,
                "top_p": settings.top_p,
                "max_tokens": settings.max_new_tokens,
                "logprobs": 0,
                "seed": stream_seed(seed, key) % 2**62,
                "stop_token_ids": list(self.policy.stop_token_ids),
                "allowed_token_ids": self._allowed,
                "detokenize": False,
            },
            "output_mode": "tokens",
        }
        answer = self._when_up(server, lambda: server.post(GENERATE, body))
        choices = sorted(answer.get("choices") or [], key=lambda choice: choice["index"])
        if len(choices) != samples:
            raise RolloutServerError(f"{server.url}{GENERATE}: {len(choices)} samples came back, not {samples}")
        expected, completions = str(self.version), []
        for choice in choices:
            ids_out = list(choice.get("token_ids") or [])
            versions = {span["version"] for span in choice.get("weight_versions") or []}
            if ids_out and versions != {expected}:
                raise ServerRestarted(
                    f"rollout server {server.url} sampled with weight version {sorted(versions) or 'unknown'}, "
                    f"not the {expected} pushed to it (it restarted, or another client changed its weights)"
                )
            content = (choice.get("logprobs") or {}).get("content") or []
            if len(content) != len(ids_out):
                raise RolloutServerError(
                    f"{server.url}{GENERATE}: log-probs for {len(content)} of {len(ids_out)} tokens came back"
                )
            completions.append((ids_out, [float(entry["logprob"]) for entry in content]))
        return completions

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for server in self.servers:
            server.close()


def _check(config: Config) -> None:
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise ConfigError("rollout.engine: vllm_server needs httpx: pip install 'opd[serve]'") from None


def _build(config: Config, policy: LoadedModel, precision: Precision) -> ServerSampler:
    from opd.rollout.vllm_engine import engine_dtype

    world = World.from_environment()
    return ServerSampler(
        policy,
        SamplingSettings.of(config.rollout),
        config.rollout.vllm_server,
        engine_dtype(config.rollout.vllm, policy, precision),
        config.data.max_prompt_tokens + config.rollout.max_new_tokens,
        world,
    )


def _memory(inputs: EngineMemoryInputs) -> EngineMemory:
    """The servers hold their own memory on their own devices; in the trainer, a push holds one unit of
    the student converted to the engine's dtype (and, sharded, that unit gathered)."""
    per_layer = inputs.student.parameters / max(1, inputs.student.layers)
    unit = {"weights sent to the rollout servers (one unit at a time)": inputs.compute_bytes * per_layer}
    notes = ("rollout.engine vllm_server: the servers' memory is on their own devices, outside this plan",)
    return EngineMemory({}, unit, notes)


ENGINE = RolloutEngine(check=_check, build=_build, memory=_memory)
