#!/usr/bin/env bash
# Device calls: the reference recipe and our settings at paper scale, on the same GPU.
#
# Prepare here (CPU machine, once):   bash benchmarks/gpu_paper_step.sh prepare
#   → .gpu/wheels  what the GPU machine lacks (diffusers, pluggy, typer, pydantic) and the peft
#                  tested here; it has torch, transformers ≥ 5.17 (checked here too), accelerate
#   → .gpu/cache   the 32k-token BPE, the CLIP tokenizer and their vocabulary map
#   → .gpu/tools   the standalone reference-recipe script (../shared does not travel)
# Run there (device tool, carry [".gpu"]):  bash benchmarks/gpu_paper_step.sh run [STAGE...]
# Stages (all of them by default; their time limits add up to more than one 600 s device call,
# so name a subset per call), each writing $OUT/STAGE.json, plus log.txt:
#   ref       the reference recipe through mmdialog.build, micro-batch 4, an optimizer step per
#             micro-batch as in the measured table
#   tool      the standalone reference script, same machine, micro-batch 4
#   tool16    the same at micro-batch 16 with gradient checkpointing (its best under its own peak)
#   sweep     our default model: every SWEEP setting at 16 dialogues per optimizer step
#   compiled  the micro-batch-16 settings again, compiled (train.compile)
#   lora      compiled, with the LoRA weights in bf16 (llm.lora.dtype: model)
#   autocast  compiled, the forward under bf16 autocast (Lightning's bf16-mixed) and, for a
#             same-machine baseline, the default setting without it (autocast_on/_off.json)
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
  shift || true
  stages=("$@"); [ ${#stages[@]} -gt 0 ] || stages=(ref tool tool16 sweep compiled lora autocast)
  export PYTHONPATH="/tmp/mmdialog-deps:$PWD" MMDIALOG_CACHE="$PWD/.gpu/cache" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
  python3 -m pip install -q --no-index --no-deps --target /tmp/mmdialog-deps .gpu/wheels/*.whl
  OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
  exec > >(tee "$OUT/log.txt") 2>&1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch, transformers, diffusers, peft, pydantic, mmdialog; \
print(torch.__version__, transformers.__version__, diffusers.__version__, peft.__version__, pydantic.__version__)"
  bench=(python3 benchmarks/bench_paper_step.py --scale paper)
  mb16=16:1:all,16:0:none,16:1:outer,16:2:all,16:0:all,16:1:none,16:2:outer
  for stage in "${stages[@]}"; do
    echo "== $stage"
    case $stage in
      ref) timeout 90 "${bench[@]}" --reference-recipe --accumulate 1 --steps 6 --warmup 2 --json "$OUT/ref.json" | tail -3 ;;
      tool) timeout 90 python3 .gpu/tools/paper_scale_step.py --scale paper --json "$OUT/tool.json" | tail -1 ;;
      tool16) timeout 90 python3 .gpu/tools/paper_scale_step.py --scale paper --batch 16 --grad-checkpointing \
                --json "$OUT/tool16.json" | tail -1 ;;
      sweep) timeout 200 "${bench[@]}" --sweep --no-compile --no-autocast --steps 3 --json "$OUT/sweep.json" 2>&1 | grep '^{"llm' ;;
      compiled) timeout 220 "${bench[@]}" --sweep --compile --no-autocast --settings $mb16 --steps 3 --warmup 2 \
                  --json "$OUT/compiled.json" 2>&1 | grep '^{"llm' ;;
      lora) timeout 130 "${bench[@]}" --sweep --compile --no-autocast --lora-dtype model --settings 16:1:all,16:0:none \
              --steps 3 --warmup 2 --json "$OUT/lora.json" 2>&1 | grep '^{"llm' ;;
      autocast) for mode in off on; do
                  if [ $mode = on ]; then extra=(--autocast --settings 16:1:all,16:0:none); else extra=(--no-autocast --settings 16:1:all); fi
                  timeout 110 "${bench[@]}" --sweep --compile "${extra[@]}" --steps 3 --warmup 2 \
                    --json "$OUT/autocast_$mode.json" 2>&1 | grep '^{"llm'
                done ;;
      *) echo "unknown stage $stage (ref tool tool16 sweep compiled lora autocast)"; exit 2 ;;
    esac || echo "$stage: exit $?"
  done
  ;;
esac
