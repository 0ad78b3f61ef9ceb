#!/usr/bin/env bash
# Run scripts/train.py as one jax.distributed job over several GPU nodes (one process per node,
# driving all of that node's GPUs; NCCL between nodes).
#
# Two ways to start it:
#   per node:  run this script on every node with the same --coordinator and --num-processes and
#              that node's --process-id (0 on the coordinator's node), e.g. from your scheduler;
#   fan-out:   run it once with --hosts h0,h1,...: it starts process i on host i over ssh
#              (h0 is the coordinator) and waits for all of them.
# Under SLURM (srun, one task per node) the ids come from SLURM_PROCID / SLURM_NTASKS when not given.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage:
  scripts/launch_gpu_multinode.sh --coordinator HOST:PORT --num-processes N --process-id I [options] -- [train.py arguments]
  scripts/launch_gpu_multinode.sh --hosts HOST0,HOST1,... [--port PORT] [options] -- [train.py arguments]

Starts `python scripts/train.py --coordinator HOST:PORT --num-processes N --process-id I <train.py arguments>`.

Options:
  --coordinator HOST:PORT  address of process 0, reachable from every node (per-node mode)
  --num-processes N        number of nodes (processes) in the job
  --process-id I           this node's index, 0 .. N-1 (0 runs the coordinator)
  --hosts H0,H1,...        fan-out mode: ssh to each host and start process i there; the
                           coordinator is H0:PORT
  --port PORT              coordinator port in fan-out mode (default: 12355)
  --repo-dir DIR           the checkout on the nodes (default: this checkout's path)
  --python PY              interpreter on the nodes (default: python3)
  --gpus LIST              CUDA_VISIBLE_DEVICES for the process (default: all GPUs of the node)
  --log-dir DIR            fan-out mode: write host i's output to DIR/process_i.log here
                           (default: print it, prefixed by the process index)
  --dry-run                print the commands instead of running them
  -h, --help               this text

Example (2 nodes x 8 H100, FSDP over all 16 GPUs):
  # on node0 (10.0.0.1) and node1, the same line with --process-id 0 and 1:
  scripts/launch_gpu_multinode.sh --coordinator 10.0.0.1:12355 --num-processes 2 --process-id 0 -- \
      --model gemma2-9b --data /data/tokens.bin --mesh fsdp=16 --batch-size 64 --seq-len 4096 \
      --remat dots_with_no_batch_dims_saveable --workdir /shared/runs/g9
  # or, from one machine with passwordless ssh to both:
  scripts/launch_gpu_multinode.sh --hosts node0,node1 -- --model gemma2-9b ...

--workdir must be a filesystem every node mounts (each process writes its own checkpoint shards);
--data must be readable on every node (it is memory-mapped; each node reads only its batch rows).
Run the same command again to resume from the latest checkpoint.
EOF
}

COORD="" NPROC="" PID="" HOSTS="" PORT=12355 PY=python3 GPUS="" LOG_DIR="" DRY=0
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --coordinator) COORD="${2:?--coordinator needs a value}"; shift 2 ;;
    --num-processes) NPROC="${2:?--num-processes needs a value}"; shift 2 ;;
    --process-id) PID="${2:?--process-id needs a value}"; shift 2 ;;
    --hosts) HOSTS="${2:?--hosts needs a value}"; shift 2 ;;
    --port) PORT="${2:?--port needs a value}"; shift 2 ;;
    --repo-dir) REPO_DIR="${2:?--repo-dir needs a value}"; shift 2 ;;
    --python) PY="${2:?--python needs a value}"; shift 2 ;;
    --gpus) GPUS="${2:?--gpus needs a value}"; shift 2 ;;
    --log-dir) LOG_DIR="${2:?--log-dir needs a value}"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "launch_gpu_multinode.sh: unknown option '$1' (train.py arguments go after --)" >&2; usage >&2; exit 2 ;;
  esac
done

die() { echo "launch_gpu_multinode.sh: $*" >&2; exit 2; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

# The command one process runs, as a single string for a shell (local or over ssh).
process_command() {
  local coord="$1" n="$2" i="$3" cmd
  cmd="cd $(printf '%q' "$REPO_DIR") && PYTHONUNBUFFERED=1"
  [[ -n "$GPUS" ]] && cmd+=" CUDA_VISIBLE_DEVICES=$(printf '%q' "$GPUS")"
  cmd+=" $(printf '%q' "$PY") scripts/train.py --coordinator $(printf '%q' "$coord") --num-processes $n --process-id $i"
  for a in "${TRAIN_ARGS[@]}"; do cmd+=" $(printf '%q' "$a")"; done
  printf '%s' "$cmd"
}

TRAIN_ARGS=("$@")

if [[ -n "$HOSTS" ]]; then
  [[ -z "$COORD$PID" ]] || die "--hosts starts every process itself: do not also give --coordinator/--process-id"
  is_int "$PORT" || die "--port must be a number, got '$PORT'"
  IFS=',' read -r -a HOST_LIST <<<"$HOSTS"
  N=${#HOST_LIST[@]}
  [[ -z "$NPROC" || "$NPROC" == "$N" ]] || die "--num-processes $NPROC does not match the $N hosts of --hosts"
  COORD="${HOST_LIST[0]}:$PORT"
  [[ -n "$LOG_DIR" ]] && mkdir -p "$LOG_DIR"
  PIDS=()
  for i in "${!HOST_LIST[@]}"; do
    host="${HOST_LIST[$i]}"
    cmd="$(process_command "$COORD" "$N" "$i")"
    if [[ $DRY -eq 1 ]]; then
      printf 'ssh %q %q\n' "$host" "$cmd"
      continue
    fi
    if [[ -n "$LOG_DIR" ]]; then
      ssh -o BatchMode=yes "$host" "$cmd" >"$LOG_DIR/process_$i.log" 2>&1 &
    else
      # Prefixed by the process index; $! stays ssh's pid, so its exit status is the one waited for.
      ssh -o BatchMode=yes "$host" "$cmd" > >(sed -u "s/^/[$i] /") 2>&1 &
    fi
    PIDS+=($!)
  done
  [[ $DRY -eq 1 ]] && exit 0
  # Any process failing fails the job (the others then stop at their next collective).
  status=0
  for p in "${PIDS[@]}"; do wait "$p" || status=$?; done
  exit $status
fi

# Per-node mode; under SLURM the rank and size default to the task's.
PID="${PID:-${SLURM_PROCID:-}}"
NPROC="${NPROC:-${SLURM_NTASKS:-}}"
[[ -n "$COORD" ]] || die "--coordinator HOST:PORT is required (or use --hosts)"
[[ "$COORD" == *:* ]] || die "--coordinator must be HOST:PORT, got '$COORD'"
is_int "$NPROC" && [[ "$NPROC" -ge 1 ]] || die "--num-processes must be a positive integer, got '${NPROC:-nothing}'"
is_int "$PID" || die "--process-id must be an integer in 0..$((NPROC - 1)), got '${PID:-nothing}'"
[[ "$PID" -lt "$NPROC" ]] || die "--process-id $PID is not below --num-processes $NPROC"

cmd="$(process_command "$COORD" "$NPROC" "$PID")"
if [[ $DRY -eq 1 ]]; then
  printf 'bash -c %q\n' "$cmd"
  exit 0
fi
exec bash -c "$cmd"
