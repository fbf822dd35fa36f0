#!/usr/bin/env bash
# One device call: the reference recipe and our default at paper scale, on the same GPU.
#
# Prepare here (CPU machine, once):   bash benchmarks/gpu_paper_step.sh prepare
#   → .gpu/wheels (what the GPU machine lacks: diffusers, pluggy, typer, pydantic-settings-free deps)
#   → .gpu/cache  (the 32k-token BPE, the CLIP tokenizer and their vocabulary map)
# Run there (device tool, carry [".gpu"]):  bash benchmarks/gpu_paper_step.sh run
# JSON lands in $OUT (ref.json, ours.json, ours_ckpt.json, tool_ref.json).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-run}" in
prepare)
  mkdir -p .gpu/wheels .gpu/cache
  .venv/bin/pip download -q --no-deps -d .gpu/wheels diffusers==0.42.1 pluggy typer shellingham
  # Build the tokenizers and the static map once, then ship the cache folder.
  MMDIALOG_CACHE="$PWD/.gpu/cache" .venv/bin/python benchmarks/bench_paper_step.py --scale tiny --device cpu \
    --micro-batch 1 --accumulate 1 --steps 1 >/dev/null
  rm -rf .gpu/cache/smollm2-135m-instruct  # 260 MB; the GPU run needs only the derived tokenizer
  du -sh .gpu
  ;;
run)
  export PYTHONPATH="/tmp/mmdialog-deps:$PWD" MMDIALOG_CACHE="$PWD/.gpu/cache" HF_HUB_OFFLINE=1
  pip install -q --no-index --no-deps --target /tmp/mmdialog-deps .gpu/wheels/*.whl
  OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python benchmarks/bench_paper_step.py --scale paper --reference-recipe --json "$OUT/ref.json" --steps 4
  python benchmarks/bench_paper_step.py --scale paper --json "$OUT/ours.json" --steps 4
  python benchmarks/bench_paper_step.py --scale paper --gradient-checkpointing --json "$OUT/ours_ckpt.json" --steps 4
  if [ -f ../shared/tools/paper_scale_step.py ]; then  # the measured reference, same machine
    python ../shared/tools/paper_scale_step.py --scale paper --json "$OUT/tool_ref.json" || true
  fi
  ;;
esac
