#!/usr/bin/env bash
# The main job, end to end on the CPU: set up .venv, collect scripted demonstrations of two tabletop
# families that share one scene (pick-place: 2 subtasks; pick-place-two: 4 subtasks; in both the
# instruction alone says which objects go where), train ONE tiny VLA on both, and evaluate it on
# unseen seeds with held-out instruction paraphrases: per-family success, videos with the decoded
# plan drawn on them. Numbers and commands: docs/RESULTS.md.
#
#   bash scripts/demo.sh                                    # defaults below
#   FAMILIES=pick-place,pick-place-two EPISODES=100 STEPS=3000 EVAL_EPISODES=25 OUT=outputs/demo bash scripts/demo.sh
#   SKIP_SETUP=1 ...                                        # use the existing .venv as it is
#   BUDGET_S=100000 ...                                     # always train all STEPS (a slower machine takes longer)
set -euo pipefail
cd "$(dirname "$0")/.."
FAMILIES="${FAMILIES:-pick-place,pick-place-two}"
EPISODES="${EPISODES:-100}"          # demonstrations per family (training seeds 0..EPISODES-1)
IMAGE="${IMAGE:-96}"                 # px; objects are ~4 px wide at 64 (docs/RESULTS.md)
LAYOUT="${LAYOUT:-slots}"            # slots: the scene's places are fixed, colours/goals vary | random
NOISE="${NOISE:-0}"                  # std of the noise on the expert's moves as executed (collect action_noise)
GOAL_FRAMES="${GOAL_FRAMES:-2500}"   # env resets per pick-first family labelled with the first grasp (0 = none)
STEPS="${STEPS:-5000}"               # training steps at batch 32 (at most: BUDGET_S decides, ~3,300 on 2 cores)
BUDGET_S="${BUDGET_S:-870}"          # the whole script, set-up included: training gets what is left after
EVAL_RESERVE_S="${EVAL_RESERVE_S:-}"     # the evaluation and start-ups are set aside (trainer.time_budget_s); empty:
                                     # 60 s (~40 s on a CPU with native bf16), 100 s without (55-66 s on an AVX2 EPYC)
EVAL_EPISODES="${EVAL_EPISODES:-25}" # per family, seeds from 1,000,000 (never collected)
SPLIT="${SPLIT:-paraphrase}"         # paraphrase: held-out wording | eval: + held-out objects | train
OUT="${OUT:-outputs/demo}"
# The tabletop recipe (docs/RESULTS.md): pretrained MiniLM text with word-level plans, a conv stem
# over 16 px patches whose features the instruction modulates (FiLM), subtask-balanced draws (every subtask of
# every family the same share: the second pick and place of pick-place-two as often as the first), and a goal
# head that points at the patch of the named object and inside it (trained on the demonstrations and the
# goal frames) and whose point the action expert reads (trained on the true goal blurred by ~1 cm), and a
# decoded plan (drawn on the videos) that the actions do not read (planner=side: 68/200 against 54/200 when
# they read it on the previous recipe, "Tenth round"; on this one side, off and on tie, "Fifteenth round"; the
# sub-patch offset: "Fourteenth round"; subtask-balanced draws: "Sixteenth round"; the peak learning rate 1e-3
# instead of trainer=cpu's 5e-4 for this short schedule: "Seventeenth round"; the plan trained on 8 rows of each
# batch and two noisy copies of each action chunk, at the same step time, neutral over three training seeds and
# measured in this job: "Eighteenth round", all in docs/RESULTS.md).
RECIPE="${RECIPE:-text=minilm planner=side model.vision=conv model.vision_film=true model.patch_size=16 \
trainer.lr=1e-3 trainer.min_lr=1e-4 dataset.balance=subtask model.goal_loss_weight=1.0 model.goal_head=point \
model.goal_patch_loss_weight=0.3 model.goal_condition=true model.goal_offset=true model.goal_condition_noise=0.05 \
model.plan_rows=8 model.flow_samples=2}"
TRAIN_ARGS="${TRAIN_ARGS:-}"         # extra `vla train` overrides (recipe experiments)
# auto: batches of 16 (+ 8 goal frames) instead of 32 (+ 16) where the CPU has no native bf16 (no avx512_bf16/amx_bf16
# in /proc/cpuinfo): training runs fp32 there, ~3x slower, and the budget fits ~1,000 steps of 32; half batches give
# 1.8x the steps and scored 47 % against 35 % on a 2-vCPU AVX2 AMD EPYC, two training seeds each (docs/RESULTS.md,
# "Twentieth round"). 1 / 0 force it on / off.
SMALL_BATCH="${SMALL_BATCH:-auto}"

start=$(date +%s)
[ -n "${SKIP_SETUP:-}" ] || bash scripts/setup.sh
. .venv/bin/activate
export MUJOCO_GL="${MUJOCO_GL:-egl}"
mkdir -p "$OUT"
rm -rf "$OUT/demos.zarr" "$OUT/train" "$OUT/eval"

echo "== 1/3 collect: $EPISODES scripted demonstrations per family of [$FAMILIES] ($IMAGE px front + wrist cameras)"
vla collect env=tabletop env.layout="$LAYOUT" "tasks=[$FAMILIES]" episodes="$EPISODES" workers=2 \
  image_size="$IMAGE" "cameras=[front,wrist]" action_noise="$NOISE" out="$OUT/demos.zarr" progress=false
vla dataset info "$OUT/demos.zarr"
rm -rf "$OUT/goal_frames.zarr"
GOAL_ARGS=""
# goal frames exist for the families whose plans start with a pick (push and drawer plans have no first grasp)
GOAL_FAMILIES=$(python -c 'import sys; from vla.envs.tabletop.tasks import starts_with_pick
print(",".join(t for t in sys.argv[1].split(",") if starts_with_pick(t)))' "$FAMILIES")
if [ "$GOAL_FRAMES" -gt 0 ] && [ -n "$GOAL_FAMILIES" ]; then  # seeds 100,000+: apart from the demos and the evaluation
  vla collect env=tabletop env.layout="$LAYOUT" "tasks=[$GOAL_FAMILIES]" goal_frames="$GOAL_FRAMES" image_size="$IMAGE" \
    "cameras=[front,wrist]" seed_start=100000 out="$OUT/goal_frames.zarr"
  GOAL_ARGS="dataset.goal_frames=$OUT/goal_frames.zarr"
fi

# the trainer's own test for bf16 (vla.training.distributed.cpu_has_native_bf16): decides both defaults below
if grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then native_bf16=1; else native_bf16=0; fi
[ "$SMALL_BATCH" != auto ] || SMALL_BATCH=$(( 1 - native_bf16 ))
[ -n "$EVAL_RESERVE_S" ] || EVAL_RESERVE_S=$([ "$native_bf16" = 1 ] && echo 60 || echo 100)
BATCH_ARGS="" BATCH_NOTE="32 + 16 goal frames"
if [ "$SMALL_BATCH" = 1 ]; then
  BATCH_ARGS="trainer.batch_size=16 dataset.goal_frames_batch=8" BATCH_NOTE="16 + 8 goal frames: no native bf16 on this CPU"
fi

train_budget=$(( BUDGET_S - ($(date +%s) - start) - EVAL_RESERVE_S ))
[ "$train_budget" -ge 60 ] || train_budget=60
echo "== 2/3 train: one tiny VLA for every family, $STEPS steps on the CPU or fewer to end within $train_budget s" \
  "(batch $BATCH_NOTE)"
# shellcheck disable=SC2086
vla train dataset.path="$OUT/demos.zarr" model=tiny trainer=cpu trainer.steps="$STEPS" trainer.time_budget_s="$train_budget" \
  trainer.progress=false trainer.log_every=250 run_dir="$OUT/train" $RECIPE $GOAL_ARGS $BATCH_ARGS $TRAIN_ARGS

trained=$(grep -o 'end step=[0-9]*' "$OUT/train/train.log" 2>/dev/null | tail -1 | cut -d= -f2 || true)
if [ "$SMALL_BATCH" != 1 ] && [ -n "$trained" ] && [ "$trained" -gt 0 ] && [ "$trained" -lt "$STEPS" ] \
    && [ "$trained" -lt 2500 ]; then
  # The recipe's success was measured at ~3,000-3,300 steps (a 2-vCPU CPU with AVX512-BF16 runs ~4.7 steps/s);
  # a 2-vCPU AVX2-only CPU runs ~1.6 and trains ~1,000 in the budget (docs/RESULTS.md, "Twentieth round").
  echo "== note: this machine trained $trained of $STEPS steps in the budget; the success in docs/RESULTS.md came" \
    "with ~3,000. BUDGET_S=$(( BUDGET_S + (3000 - trained) * train_budget / trained )) would train ~3,000 here."
elif [ "$SMALL_BATCH" = 1 ]; then
  echo "== note: batches of 16 (no native bf16 on this CPU: fp32 training, ~3x slower); the ~75 % of docs/RESULTS.md" \
    "came with ~3,000 steps of 32 on a CPU with AVX512-BF16 (SMALL_BATCH=0 BUDGET_S=2200 trains that on a 2-vCPU AVX2 EPYC)."
fi

echo "== 3/3 evaluate: $EVAL_EPISODES episodes per family on unseen seeds, instruction split '$SPLIT'"
vla eval checkpoint="$OUT/train" episodes="$EVAL_EPISODES" n_envs=2 instruction_split="$SPLIT" \
  videos=2 progress=false run_dir="$OUT/eval"

echo "== done in $(( $(date +%s) - start )) s: results $OUT/eval/eval_info.json, videos $OUT/eval/videos/"
