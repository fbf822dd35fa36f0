#!/usr/bin/env bash
# One device call: the reference recipe and our sweep at paper scale, on the same GPU.
#
# Prepare here (CPU machine, once):   bash benchmarks/gpu_paper_step.sh prepare
#   → .gpu/wheels  what the GPU machine lacks (diffusers, pluggy, typer, pydantic) and the peft
#                  tested here; it has torch, transformers ≥ 5.17 (checked here too), accelerate
#   → .gpu/cache   the 32k-token BPE, the CLIP tokenizer and their vocabulary map
#   → .gpu/tools   the standalone reference-recipe script (../shared does not travel)
# Run there (device tool, carry [".gpu"]):  bash benchmarks/gpu_paper_step.sh run
# What lands in $OUT: ref.json (the reference recipe through mmdialog.build, an optimizer step
# every 4 dialogues as in the measured table), tool_ref.json (the standalone script on the same
# machine), sweep.json (our default model: micro-batch × checkpointing settings at 16 dialogues
# per optimizer step, then the best one compiled) and log.txt. The three stages' time limits
# add up to 540 s, inside one 600 s device call.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-run}" in
prepare)
  rm -rf .gpu && mkdir -p .gpu/wheels .gpu/cache .gpu/tools
  .venv/bin/pip download -q --no-deps -d .gpu/wheels --python-version 3.12 --only-binary=:all: \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    diffusers==0.42.1 peft==0.21.2 pluggy typer shellingham pydantic==2.14.4 \
    "pydantic_core==$(.venv/bin/python -c 'import pydantic_core; print(pydantic_core.__version__)')" \
    annotated_types typing_inspection typing_extensions
  # Build the tokenizers and the static map once, then ship the cache folder.
  MMDIALOG_CACHE="$PWD/.gpu/cache" .venv/bin/python benchmarks/bench_paper_step.py --scale tiny --device cpu \
    --micro-batch 1 --accumulate 1 --steps 1 >/dev/null
  rm -rf .gpu/cache/smollm2-135m-instruct  # 260 MB; the GPU run needs only the derived tokenizer
  cp ../shared/tools/paper_scale_step.py .gpu/tools/
  du -sh .gpu
  ;;
run)
  export PYTHONPATH="/tmp/mmdialog-deps:$PWD" MMDIALOG_CACHE="$PWD/.gpu/cache" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
  python3 -m pip install -q --no-index --no-deps --target /tmp/mmdialog-deps .gpu/wheels/*.whl
  OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
  exec > >(tee "$OUT/log.txt") 2>&1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch, transformers, diffusers, peft, pydantic, mmdialog; \
print(torch.__version__, transformers.__version__, diffusers.__version__, peft.__version__, pydantic.__version__)"
  bench=benchmarks/bench_paper_step.py
  timeout 110 python3 $bench --scale paper --reference-recipe --accumulate 1 --steps 6 --warmup 2 \
    --json "$OUT/ref.json" | tail -4 || echo "reference recipe: exit $?"
  timeout 100 python3 .gpu/tools/paper_scale_step.py --scale paper --json "$OUT/tool_ref.json" | tail -1 \
    || echo "tool reference: exit $?"
  timeout 330 python3 $bench --scale paper --sweep --compile --steps 3 --json "$OUT/sweep.json" 2>&1 \
    | grep -v Warning || echo "sweep: exit $?"
  ;;
esac
