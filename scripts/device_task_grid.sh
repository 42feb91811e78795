#!/usr/bin/env bash
# One device call of issue 11's task grid (1-GPU kind, carry .whl): call CALL_INDEX of the committed plan
# results/task-grid-plan.json (scripts/plan_task_grid.py), every slice an `attnbench train suite=tasks_grid
# tasks=[..] methods=[..] seeds=[..]` into the one run folder results/h200-task-grid.
#
#   bash scripts/device_task_grid.sh 0          # PLAN=... to use another plan; WALL=570 (seconds, the hard cap)
#   bash scripts/device_task_grid.sh 0 1 2      # several planned calls' slices in one device call, in order, until
#                                                # the cap (the plan's estimates are conservative: on the H200 its
#                                                # calls 0-2, estimated ~540 s each, took 86, 245 and 413 s)
#   PARALLEL=4 bash scripts/device_task_grid.sh 0   # 4 cases at once on the GPU (attnbench train parallel=4;
#                                                # rows carry concurrent=4). Default: the plan's "parallel"
#                                                # (what its call estimates assume; 1 for a plan without it).
#                                                # A slice whose overrides carry their own parallel= (and
#                                                # case_timeout_s=): an autotuning method's (fla), planned to
#                                                # run fewer cases at once, keeps its own
#   RETRY=error,timeout bash scripts/device_task_grid.sh 2   # re-run the slices' cases whose rows have these
#                                                # statuses (attnbench train retry=[..]); default: the plan's
#                                                # "retry" (plan_task_grid.py --retry), RETRY= for none
#
# Outputs: the device tool returns at most 8 files from $OUT (two folders down), and a call that writes more
# loses the ones past the count: the run folder, the slices' logs and install.txt are written to a scratch folder
# (SCRATCH, default /tmp/task-grid-out) and come back packed, $OUT holding only runs.tgz, logs.tgz,
# slices.txt, slices-done.txt, report.txt, triton-autotune.tgz and not-started.txt (if any).
#
# Resumable: the committed results/h200-task-grid (if any) is copied into $SCRATCH/results first, so cases that
# already have rows are skipped, and a call cut by the wall cap (SIGTERM: finished rows kept, the case in
# flight left without a row) is finished by running the same call again. Slices that cannot start before the
# cap are listed in $OUT/not-started.txt, never dropped silently: they stay in the next plan
# (scripts/plan_task_grid.py --done results/h200-task-grid). Afterwards, on the workstation:
#   tar xzf <files_at>/runs.tgz -C .   (replaces results/h200-task-grid), commit it, then re-plan with --done.
set -u
CALL=${1:?usage: device_task_grid.sh CALL_INDEX [CALL_INDEX ...]}
CALLS="$*"  # several calls of the plan in one device call: their slices in order until the wall cap
PLAN=${PLAN:-results/task-grid-plan.json}
WALL=${WALL:-570}          # seconds for this whole script (the device tool allows 600 a command)
FINISH_S=${FINISH_S:-35}   # kept back for finalize, report and the tarball
SCRATCH=${SCRATCH:-/tmp/task-grid-out}
LOGS=$SCRATCH/logs
rm -rf "$SCRATCH"  # a warm machine keeps /tmp between calls: each call starts from the committed run folder
mkdir -p "$LOGS"
[ -f "$PLAN" ] || { echo "no plan at $PLAN: run scripts/plan_task_grid.py and commit it"; exit 2; }
# cases run at once in each slice (attnbench train parallel=N): the plan's, unless PARALLEL is set
PARALLEL=${PARALLEL:-$(python3 -c "import json,sys; print(json.load(open(sys.argv[1])).get('parallel', 1))" "$PLAN")}
if [ "${INSTALL:-1}" = 1 ]; then  # INSTALL=0: attnbench is importable already (the CPU test of this script)
  if ! python3 -c "import hydra" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  fi
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > $LOGS/install.txt 2>&1 \
    || export PYTHONPATH=$PWD:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
export TRITON_CACHE_AUTOTUNING=1  # fla's per-process autotuning (60-94 s) once per machine, not per invocation
# ... and once across calls: the carried .triton-cache (git-ignored) holds the earlier calls' tuned configs, and
# this call's come back as $OUT/triton-autotune.tgz (unpack it into .triton-cache, as for scripts/device_wrap.sh)
mkdir -p .triton-cache
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
# the tuned configs committed in scripts/device-cache (a fresh checkout has no .triton-cache: it is git-ignored);
# files already carried win. Refresh the tarball after a call: scripts/refresh_autotune_cache.sh <files_at>
[ -f scripts/device-cache/triton-autotune.tgz ] && \
  tar xzf scripts/device-cache/triton-autotune.tgz -C "$TRITON_CACHE_DIR" --skip-old-files 2>/dev/null
# the call's slices, one line of overrides each (the plan's suite and extra overrides first); exits 2 on a bad index
python3 - "$PLAN" $CALLS > $OUT/slices.txt <<'EOF' || { cat $OUT/slices.txt; exit 2; }
import json, sys
plan = json.load(open(sys.argv[1]))
base = [f"suite={plan['suite']}", *plan.get("overrides", []), f"run_id={plan['run_id']}"]
lines = []
for text in sys.argv[2:]:
    index = int(text) if text.isdigit() else -1
    if not 0 <= index < len(plan["calls"]):
        print(f"call {text} is not in the plan (calls 0..{len(plan['calls']) - 1})")
        sys.exit(2)
    lines += [" ".join(base + piece["overrides"]) for piece in plan["calls"][index]["slices"]]
print("\n".join(lines))
EOF
RUN=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['run_id'])" "$PLAN")
# the statuses the plan re-plans (plan_task_grid.py --retry): the run resumes them too (RETRY= overrides, e.g. empty)
RETRY=${RETRY-$(python3 -c "import json,sys; print(','.join(json.load(open(sys.argv[1])).get('retry', [])))" "$PLAN")}
echo "retry: [${RETRY}]" > $LOGS/retry.txt
R=$SCRATCH/results
mkdir -p $R
[ -d results/$RUN ] && cp -r results/$RUN $R/
i=0
set -f  # the overrides hold [ ]: no globbing while they are split into words
while read -r line; do
  left=$((WALL - FINISH_S - SECONDS))
  if [ $left -lt 30 ]; then
    echo "slice $i not started ($left s left): $line" | tee -a $OUT/not-started.txt
  else
    # a slice with its own parallel (an autotuning method's: fewer at once) keeps it; the others get PARALLEL
    case " $line " in *" parallel="*) SLICE_PARALLEL="" ;; *) SLICE_PARALLEL="parallel=$PARALLEL" ;; esac
    timeout -s TERM -k 20 $left python3 -m attnbench.cli train $line $SLICE_PARALLEL results_dir=$R ${RETRY:+retry=[$RETRY]} > $LOGS/slice$i.txt 2>&1
    echo "slice $i rc=$? at ${SECONDS}s: $line" | tee -a $OUT/slices-done.txt
  fi
  i=$((i + 1))
done < $OUT/slices.txt
set +f
if [ -d $R/$RUN ]; then
  python3 -c "from attnbench.record.quality import QualityStore; QualityStore('$R/$RUN').finalize()"
  timeout $((FINISH_S > 10 ? FINISH_S - 10 : 5)) python3 -m attnbench.cli report $R/$RUN > $OUT/report.txt 2>&1
  tar czf $OUT/runs.tgz -C $SCRATCH results
fi
tar czf $OUT/logs.tgz -C $SCRATCH logs
( cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 | tar -czf "$OUT/triton-autotune.tgz" --null -T - ) 2>/dev/null
for f in $LOGS/slice*.txt; do [ -f "$f" ] && tail -n 3 "$f"; done | grep -v "^$" | tail -n 40
