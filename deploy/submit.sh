#!/usr/bin/env bash
# Submit a training job to a running Ray cluster.
#   deploy/submit.sh http://HEAD:8265 configs/my.yaml [overrides...]
set -euo pipefail
dashboard=${1:?usage: submit.sh DASHBOARD_URL CONFIG [overrides...]}
config=${2:?usage: submit.sh DASHBOARD_URL CONFIG [overrides...]}
shift 2
exec ray job submit --address "$dashboard" --working-dir . -- rlhf-cluster train "$config" "$@" --address auto
