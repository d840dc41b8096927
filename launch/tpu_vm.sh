#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice, install codegen-jax on every worker, run the same
# `codegen-jax train` command on all of them (jax.distributed finds the pod on its own), stream logs,
# and delete the TPU on request.
#
#   launch/tpu_vm.sh create  NAME ZONE ACCELERATOR [VERSION]   e.g. create cj-v5e v5litepod-8 ...
#   launch/tpu_vm.sh install NAME ZONE                         copy this repo, pip install '.[tpu,gcs]'
#   launch/tpu_vm.sh train   NAME ZONE CONFIG [train arguments...]
#   launch/tpu_vm.sh logs    NAME ZONE
#   launch/tpu_vm.sh delete  NAME ZONE
#
# On pods, --workdir must be shared by every worker (e.g. gs://BUCKET/runs/NAME, read with the VM's
# service account): each worker writes its checkpoint shards there.
set -euo pipefail

usage() {
  sed -n '2,13p' "$0" >&2
  exit 2
}
[[ $# -ge 3 ]] || usage
action=$1
name=$2
zone=$3
shift 3
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$1"
}

case "$action" in
  create)
    [[ $# -ge 1 ]] || usage
    accelerator=$1
    version=${2:-v2-alpha-tpuv5-lite}
    gcloud compute tpus tpu-vm create "$name" --zone "$zone" \
      --accelerator-type "$accelerator" --version "$version"
    ;;
  install)
    tar -C "$repo" --exclude .venv --exclude runs --exclude .git -czf /tmp/codegen_jax.tgz .
    gcloud compute tpus tpu-vm scp /tmp/codegen_jax.tgz "$name":~/ --zone "$zone" --worker=all
    ssh_all "mkdir -p codegen_jax && tar -C codegen_jax -xzf codegen_jax.tgz && \
      cd codegen_jax && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu,gcs]'"
    ;;
  train)
    [[ $# -ge 1 ]] || usage
    config=$1
    shift
    args=$(printf ' %q' "$@")
    ssh_all "cd codegen_jax && nohup .venv/bin/codegen-jax train --config $config$args \
      > train.log 2>&1 &"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=0 \
      --command "tail -f codegen_jax/train.log"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$name" --zone "$zone" --quiet
    ;;
  *)
    usage
    ;;
esac
