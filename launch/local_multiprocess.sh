#!/usr/bin/env bash
# Run N `codegen-jax train` processes on this machine, joined by jax.distributed over 127.0.0.1:
# the multi-host code path (one process per host on a pod) without a cluster. Used by the tests.
#
#   launch/local_multiprocess.sh N CONFIG [train arguments...]
#   launch/local_multiprocess.sh 2 configs/tiny.yaml --workdir runs/mp train.steps=6
#
# Environment: DEVICES_PER_PROCESS (forced CPU devices per process, default 2), PORT (coordinator
# port, default: a free one), CODEGEN_JAX (the command, default .venv/bin/codegen-jax or codegen-jax).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 N CONFIG [train arguments...]" >&2
  exit 2
fi
n_proc=$1
config=$2
shift 2
if ! [[ $n_proc =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: N must be a positive integer, got '$n_proc'" >&2
  exit 2
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
default_cmd=codegen-jax
if [[ -x "$here/.venv/bin/codegen-jax" ]]; then
  default_cmd="$here/.venv/bin/codegen-jax"
fi
cmd=${CODEGEN_JAX:-$default_cmd}
devices=${DEVICES_PER_PROCESS:-2}
port=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
# shellcheck disable=SC2317,SC2329  # called by the trap below
forward() {
  # preemption: pass SIGTERM/SIGINT on so every process saves its part of the checkpoint
  kill -TERM "${pids[@]}" 2>/dev/null || true
}
trap forward TERM INT

for ((i = 0; i < n_proc; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu \
    "$cmd" train --config "$config" --coordinator "127.0.0.1:$port" \
    --num-processes "$n_proc" --process-id "$i" "$@" &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
