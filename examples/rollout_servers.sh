#!/usr/bin/env bash
# Rollout servers on devices of their own, a teacher server, and the trainer under torchrun on the rest,
# on one machine; everything it started is stopped when the trainer ends, fails, or on Ctrl-C.
#
#   examples/rollout_servers.sh CONFIG [--set KEY=VALUE ...]
#
# The default layout is AsyncOPD's on 8 GPUs, for examples/gsm8k_qwen3.yaml (docs/rollout_engine.md,
# "A layout for 8 GPUs"): GPUs 0-3 each hold a rollout server of the student (opd serve-student),
# GPUs 4-6 the trainer (3 ranks), GPU 7 the teacher (opd serve-teacher). Set in the environment:
#   STUDENT          the student's model, as the config's student.path     (default Qwen/Qwen3-1.7B)
#   ROLLOUT_DEVICES  one rollout server per entry, each entry its CUDA_VISIBLE_DEVICES
#                    ("0,1" gives a server two GPUs: add SERVER_ARGS="-- --tensor-parallel-size 2")
#                    (default "0 1 2 3"; "cpu" for a server without a GPU)
#   TRAINER_DEVICES  the trainer's GPUs, one rank each (default 4,5,6; "cpu" for one rank on the CPU)
#   TEACHER          a teacher model to serve on TEACHER_DEVICE (default Qwen/Qwen3-8B;
#                    empty: the config's own teacher, loaded by the trainer)
#   TEACHER_DEVICE   (default 7)
#   SERVER_ARGS      more arguments for every opd serve-student (e.g. "--max-model-len 4096")
#   LOGS             where each server's log goes (default logs/)
# Servers bind 127.0.0.1: the trainer reaches them on this machine only, and so does nobody else
# (their weight routes take no API key). Across machines, see docs/rollout_engine.md on security.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG [--set KEY=VALUE ...]" >&2
    exit 2
fi
STUDENT=${STUDENT:-Qwen/Qwen3-1.7B}
ROLLOUT_DEVICES=${ROLLOUT_DEVICES:-0 1 2 3}
TRAINER_DEVICES=${TRAINER_DEVICES:-4,5,6}
TEACHER=${TEACHER-Qwen/Qwen3-8B}
TEACHER_DEVICE=${TEACHER_DEVICE:-7}
SERVER_ARGS=${SERVER_ARGS:-}
LOGS=${LOGS:-logs}
mkdir -p "$LOGS"

groups=()  # each server runs in a process group of its own, so stopping it stops its workers too
trainer=""
stop() {
    [[ -n $trainer ]] && kill -TERM "$trainer" 2>/dev/null  # torchrun passes it on to its ranks
    for group in "${groups[@]}"; do kill -TERM -- "-$group" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap stop EXIT
trap 'exit 130' INT TERM  # the trainer runs in the background so that these are heard at once

wait_healthy() {  # URL PID LOG: until URL/health answers 200, or the server exits
    until curl -sf -o /dev/null "$1/health"; do
        if ! kill -0 "$2" 2>/dev/null; then
            echo "a server exited before it answered; its log: $3" >&2
            exit 1
        fi
        sleep 2
    done
}

devices_for() { [[ $1 == cpu ]] && echo "" || echo "$1"; }

urls=()
pids=()
port=8100
for devices in $ROLLOUT_DEVICES; do
    # shellcheck disable=SC2086  # SERVER_ARGS is a list of arguments
    CUDA_VISIBLE_DEVICES=$(devices_for "$devices") setsid opd serve-student "$STUDENT" --port "$port" \
        $SERVER_ARGS >"$LOGS/rollout-$port.log" 2>&1 &
    groups+=($!)
    pids+=($!)
    urls+=("\"http://127.0.0.1:$port\"")
    port=$((port + 1))
done
overrides=(rollout.engine=vllm_server "rollout.vllm_server.urls=[$(IFS=,; echo "${urls[*]}")]")
if [[ -n $TEACHER ]]; then
    CUDA_VISIBLE_DEVICES=$(devices_for "$TEACHER_DEVICE") setsid opd serve-teacher "$TEACHER" --port 8000 \
        >"$LOGS/teacher.log" 2>&1 &
    groups+=($!)
    wait_healthy http://127.0.0.1:8000 $! "$LOGS/teacher.log"
    overrides+=(teacher.path=null teacher.url=http://127.0.0.1:8000)
fi
for index in "${!pids[@]}"; do
    wait_healthy "http://127.0.0.1:$((8100 + index))" "${pids[$index]}" "$LOGS/rollout-$((8100 + index)).log"
done
echo "servers up: ${urls[*]}" >&2

config=$1
shift
if [[ $TRAINER_DEVICES == cpu ]]; then
    CUDA_VISIBLE_DEVICES="" opd train "$config" "$@" --set "${overrides[@]}" &
else
    ranks=$(awk -F, '{print NF}' <<<"$TRAINER_DEVICES")
    CUDA_VISIBLE_DEVICES=$TRAINER_DEVICES torchrun --nproc-per-node "$ranks" -m opd train "$config" "$@" \
        --set "${overrides[@]}" &
fi
trainer=$!
status=0
wait "$trainer" || status=$?
trainer=""
exit "$status"
