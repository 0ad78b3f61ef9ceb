#!/usr/bin/env bash
# Run scripts/train.py on every host of a Cloud TPU pod slice (v4 / v5e / v5p / v6e) at once.
#
# Every worker runs the same command; jax.distributed.initialize() finds the other workers by
# itself on Cloud TPU (train.py --distributed), each host feeds only its own rows of every batch,
# and Orbax writes each host's shards of the checkpoint. --workdir must therefore be storage all
# workers share: a gs:// bucket (or a filesystem mounted on every worker).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/launch_tpu_pod.sh --tpu NAME --zone ZONE [options] -- [train.py arguments]

Runs `python3 scripts/train.py --distributed <train.py arguments>` on all workers of the TPU VM
pod slice NAME through `gcloud compute tpus tpu-vm ssh --worker=all`.

Options:
  --tpu NAME          TPU VM name (required)
  --zone ZONE         its zone, e.g. us-east5-a (required)
  --project ID        Google Cloud project (default: gcloud's configured project)
  --repo-dir DIR      where the checkout lives on the workers (default: ~/vishwam_jax)
  --sync              first copy this checkout to --repo-dir on every worker (gcloud scp)
  --setup             first install the package and jax[tpu] on every worker (pip, user site)
  --python PY         interpreter on the workers (default: python3)
  --log FILE          also write each worker's output to FILE on that worker (default: none)
  --dry-run           print the gcloud commands instead of running them
  -h, --help          this text

Example (DeepSeek-V3 tiny on a v5p-32: 4 hosts x 4 chips, FSDP 8 x expert 2):
  scripts/launch_tpu_pod.sh --tpu my-v5p-32 --zone us-east5-a --sync --setup -- \
      --model deepseek-v3-tiny --data /data/tokens.bin --data-dtype uint32 \
      --mesh fsdp=8,expert=2 --batch-size 256 --seq-len 2048 --steps 10000 \
      --workdir gs://my-bucket/runs/dsv3-tiny

Run the same command again to resume from the latest checkpoint in --workdir. --data is
memory-mapped, so it must be a local path on every worker (copy the token file to each worker's
disk, or use a shared mount); each host reads only the windows of its own batch rows.
EOF
}

TPU="" ZONE="" PROJECT="" REPO_DIR='~/vishwam_jax' SYNC=0 SETUP=0 PY=python3 LOG="" DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="${2:?--tpu needs a value}"; shift 2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
    --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
    --repo-dir) REPO_DIR="${2:?--repo-dir needs a value}"; shift 2 ;;
    --sync) SYNC=1; shift ;;
    --setup) SETUP=1; shift ;;
    --python) PY="${2:?--python needs a value}"; shift 2 ;;
    --log) LOG="${2:?--log needs a value}"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "launch_tpu_pod.sh: unknown option '$1' (train.py arguments go after --)" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ -z "$TPU" || -z "$ZONE" ]]; then
  echo "launch_tpu_pod.sh: --tpu and --zone are required" >&2
  usage >&2
  exit 2
fi
if [[ $DRY -eq 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
  echo "launch_tpu_pod.sh: gcloud not found (install the Google Cloud CLI)" >&2
  exit 127
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone "$ZONE" --worker=all)
[[ -n "$PROJECT" ]] && COMMON+=(--project "$PROJECT")

run() {
  if [[ $DRY -eq 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

# The train.py arguments, quoted once for the remote shell.
TRAIN_ARGS=""
for a in "$@"; do TRAIN_ARGS+=" $(printf '%q' "$a")"; done

if [[ $SYNC -eq 1 ]]; then
  # A tarball of the tracked and untracked-but-not-ignored files: no virtualenvs, caches or checkpoints.
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  TARBALL="$TMP/vishwam_jax.tar.gz"
  (cd "$HERE" && git ls-files -co --exclude-standard -z | tar --null -czf "$TARBALL" -T -)
  run "${GCLOUD[@]}" scp "$TARBALL" "$TPU:/tmp/vishwam_jax.tar.gz" "${COMMON[@]}"
  run "${GCLOUD[@]}" ssh "$TPU" "${COMMON[@]}" --command "mkdir -p $REPO_DIR && tar -xzf /tmp/vishwam_jax.tar.gz -C $REPO_DIR"
fi

if [[ $SETUP -eq 1 ]]; then
  run "${GCLOUD[@]}" ssh "$TPU" "${COMMON[@]}" --command \
    "cd $REPO_DIR && $PY -m pip install -q --user -U 'jax[tpu]' && $PY -m pip install -q --user -e ."
fi

CMD="cd $REPO_DIR && PYTHONUNBUFFERED=1 $PY scripts/train.py --distributed$TRAIN_ARGS"
[[ -n "$LOG" ]] && CMD="set -o pipefail; $CMD 2>&1 | tee $(printf '%q' "$LOG")"
run "${GCLOUD[@]}" ssh "$TPU" "${COMMON[@]}" --command "$CMD"
