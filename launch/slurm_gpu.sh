#!/usr/bin/env bash
# Submit a multi-node GPU run of clamp-jax to SLURM.
#
#   launch/slurm_gpu.sh --nodes 4 --gpus-per-node 8 --partition gpu -- \
#       --config=configs/llama7b.py --workdir=/shared/clamp7b
#
# The script writes a batch script and submits it with sbatch. In the job, srun starts one
# process per GPU (--per gpu, the default) or one per node (--per node). Each process calls
# jax.distributed.initialize with values taken from SLURM's variables. The coordinator is the
# first node of SLURM_JOB_NODELIST, the process count SLURM_NTASKS, the process index
# SLURM_PROCID. JAX_LOCAL_DEVICE_IDS gives each process its GPU (SLURM_LOCALID) or, per node, all
# of them. SLURM sends SIGTERM --signal-seconds before the time limit; the training loop then
# saves a checkpoint at JAX's preemption sync point and exits 0, and submitting the same command
# again resumes. The workdir must be on a filesystem that every node shares.
#
# --dry-run prints the batch script and the sbatch command instead of submitting.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

nodes=1
gpus_per_node=8
per='gpu'
partition=''
account=''
time_limit='24:00:00'
job_name='clamp-jax'
cpus_per_node=''
venv="$REPO_ROOT/.venv"
port=''
signal_seconds=300
log_dir="$REPO_ROOT/logs"
dry_run=0
main_args=()

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --nodes N            nodes (default: 1)
  --gpus-per-node G    GPUs on each node (default: 8)
  --per gpu|node       one process per GPU or one per node (default: gpu)
  --partition P        SLURM partition (default: the cluster's default)
  --account A          SLURM account to charge (default: yours)
  --time T             time limit, e.g. 24:00:00 (default: 24:00:00)
  --job-name NAME      job name (default: clamp-jax)
  --cpus-per-node C    CPU cores per node, split over its processes (default: SLURM's)
  --venv DIR           virtual environment to activate (default: REPO/.venv)
  --port PORT          coordinator port on the first node (default: 20000 + job id % 20000)
  --signal-seconds S   send SIGTERM this many seconds before the time limit (default: 300)
  --log-dir DIR        folder of the job's output file (default: REPO/logs)
  --dry-run            print the batch script and the sbatch command instead of submitting
  -h, --help           show this help
EOF
}

fail() {
  echo "error: $*" >&2
  exit 2
}

positive() {
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || fail "$1 must be a positive integer, got '$2'"
}

while (( $# )); do
  case "$1" in
    --nodes) nodes="${2:?--nodes needs a value}"; shift ;;
    --gpus-per-node) gpus_per_node="${2:?--gpus-per-node needs a value}"; shift ;;
    --per) per="${2:?--per needs a value}"; shift ;;
    --partition) partition="${2:?--partition needs a value}"; shift ;;
    --account) account="${2:?--account needs a value}"; shift ;;
    --time) time_limit="${2:?--time needs a value}"; shift ;;
    --job-name) job_name="${2:?--job-name needs a value}"; shift ;;
    --cpus-per-node) cpus_per_node="${2:?--cpus-per-node needs a value}"; shift ;;
    --venv) venv="${2:?--venv needs a value}"; shift ;;
    --port) port="${2:?--port needs a value}"; shift ;;
    --signal-seconds) signal_seconds="${2:?--signal-seconds needs a value}"; shift ;;
    --log-dir) log_dir="${2:?--log-dir needs a value}"; shift ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; main_args=("$@"); break ;;
    *) fail "unknown argument '$1'; see --help" ;;
  esac
  shift
done

positive --nodes "$nodes"
positive --gpus-per-node "$gpus_per_node"
positive --signal-seconds "$signal_seconds"
if [[ -n "$port" ]]; then
  positive --port "$port"
fi
if [[ -n "$cpus_per_node" ]]; then
  positive --cpus-per-node "$cpus_per_node"
fi
case "$per" in
  gpu) tasks_per_node="$gpus_per_node" ;;
  node) tasks_per_node=1 ;;
  *) fail "--per must be 'gpu' or 'node', got '$per'" ;;
esac
(( ${#main_args[@]} )) || fail 'give the clamp_jax.main flags after --, e.g. -- --config=configs/llama7b.py --workdir=/shared/run'

if [[ "$per" == gpu ]]; then
  # Each process drives the GPU with its node-local task index, expanded inside the task.
  # shellcheck disable=SC2016
  device_ids='$SLURM_LOCALID'
else
  device_ids="$(seq -s, 0 $(( gpus_per_node - 1 )))"
fi

write_batch_script() {
  local flags
  printf -v flags ' %q' "${main_args[@]}"
  echo '#!/usr/bin/env bash'
  printf '#SBATCH --job-name=%s\n' "$job_name"
  printf '#SBATCH --nodes=%d\n' "$nodes"
  printf '#SBATCH --ntasks-per-node=%d\n' "$tasks_per_node"
  printf '#SBATCH --gpus-per-node=%d\n' "$gpus_per_node"
  if [[ -n "$cpus_per_node" ]]; then
    printf '#SBATCH --cpus-per-task=%d\n' $(( cpus_per_node / tasks_per_node > 0 ? cpus_per_node / tasks_per_node : 1 ))
  fi
  printf '#SBATCH --time=%s\n' "$time_limit"
  printf '#SBATCH --signal=TERM@%d\n' "$signal_seconds"
  printf '#SBATCH --output=%s/%%x-%%j.out\n' "$log_dir"
  if [[ -n "$partition" ]]; then
    printf '#SBATCH --partition=%s\n' "$partition"
  fi
  if [[ -n "$account" ]]; then
    printf '#SBATCH --account=%s\n' "$account"
  fi
  cat <<EOF
set -euo pipefail
cd $(printf '%q' "$REPO_ROOT")
if [[ -f $(printf '%q' "$venv")/bin/activate ]]; then
  # shellcheck source=/dev/null
  source $(printf '%q' "$venv")/bin/activate
fi
coordinator_host="\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1)"
coordinator_port=${port:-"\$(( 20000 + SLURM_JOB_ID % 20000 ))"}
export CLAMP_COORDINATOR="\$coordinator_host:\$coordinator_port"
echo "Job \$SLURM_JOB_ID: \$SLURM_NTASKS processes on \$SLURM_JOB_NUM_NODES nodes, coordinator \$CLAMP_COORDINATOR"
# Single quotes: each task expands its own SLURM_PROCID and SLURM_LOCALID.
# shellcheck disable=SC2016
srun --kill-on-bad-exit=1 bash -c 'export JAX_LOCAL_DEVICE_IDS="$device_ids"
exec python -m clamp_jax.main "\$@" --config.distributed.initialize=yes \\
  --config.distributed.coordinator_address="\$CLAMP_COORDINATOR" \\
  --config.distributed.num_processes="\$SLURM_NTASKS" \\
  --config.distributed.process_id="\$SLURM_PROCID"' clamp-jax$flags
EOF
}

if (( dry_run )); then
  echo "# Batch script (sbatch reads it from standard input):"
  write_batch_script
  printf '+ mkdir -p %q\n' "$log_dir"
  echo '+ sbatch --parsable'
  exit 0
fi

mkdir -p "$log_dir"
write_batch_script | sbatch --parsable
