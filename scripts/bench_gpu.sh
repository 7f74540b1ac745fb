#!/usr/bin/env bash
# The GPU benchmark set, JSON per benchmark into one folder (BENCHMARKS.md "GPU" has the numbers):
#   inference.json  chunk latency for tiny/small/base in bf16, batch 1 and 32, one and two 128 px cameras:
#                   prefix / plan / actions, with and without the KV cache, with CUDA graphs, kernel counts,
#                   FLOPs against the measured bf16 matmul peak
#   train.json      training samples/s, data-wait fraction and MFU for small and base in bf16 (compile off/on)
#
#   bash scripts/bench_gpu.sh outputs/bench_gpu          # REPEATS=20 STEPS=30 TRAIN_BATCH=128
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-outputs/bench_gpu}"
REPEATS="${REPEATS:-20}"
STEPS="${STEPS:-30}"
TRAIN_BATCH="${TRAIN_BATCH:-128}"
RECIPE="${RECIPE:-model.vision=conv,model.vision_film=true,model.patch_size=16}"
mkdir -p "$OUT"
vla bench inference "presets=[tiny,small,base]" device=cuda dtype=bf16 "batch=[1,32]" "cameras=[1,2]" \
  image_size=128 repeats="$REPEATS" graphs=true kernels=true "peak_sizes=[4096,8192]" > "$OUT/inference.json" \
  || echo "bench inference failed (rc $?)"
vla bench train "presets=[small]" device=cuda batch_size="$TRAIN_BATCH" steps="$STEPS" warmup=10 cameras=2 \
  image_size=128 "compile=[false,true]" "overrides=[$RECIPE]" > "$OUT/train_small.json" || echo "bench train small failed"
vla bench train "presets=[base]" device=cuda batch_size="$TRAIN_BATCH" steps="$STEPS" warmup=10 cameras=2 \
  image_size=128 "overrides=[$RECIPE]" > "$OUT/train_base.json" || echo "bench train base failed"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
try:
    inf = json.loads((out / "inference.json").read_text())
    print(f"inference on {inf['device']}, bf16 peak {max(inf['matmul_peak_gflops'].values()) / 1e3:.0f} TFLOP/s (ms per chunk)")
    print(f"{'row':34s} {'cached':>7s} {'graphs':>7s} {'uncach':>7s} {'plan':>7s} {'kern':>5s} {'kern_g':>6s} {'%peak':>6s}")
    for k, r in inf["presets"].items():
        lat, kc = r["chunk_latency_s"], r.get("kernels_per_chunk", {})
        pd = r.get("plan_decode", {})
        print(f"{k:34s} {lat['cached']*1e3:7.2f} {lat.get('cached_graphs', float('nan'))*1e3:7.2f} "
              f"{lat['uncached']*1e3:7.2f} {pd.get('total_with_plan_s', float('nan'))*1e3:7.1f} "
              f"{kc.get('cached') or 0:5d} {kc.get('cached_graphs') or 0:6d} "
              f"{100 * r.get('achieved_frac_of_peak_cached_graphs', r['achieved_frac_of_peak_cached']):6.2f}")
except Exception as e:
    print("inference table:", e)
for name in ("train_small", "train_base"):
    try:
        tr = json.loads((out / f"{name}.json").read_text())
        for r in tr["results"]:
            print(f"train {r['preset']} compile={r['compile']} bf16={r['bf16']}: {r['samples_per_s']:.0f} samples/s, "
                  f"step {r['step_ms']:.1f} ms, data wait {100*r['data_wait_frac']:.1f}%, MFU {100*r.get('mfu', 0):.1f}%")
    except Exception as e:
        print(name, e)
PY
