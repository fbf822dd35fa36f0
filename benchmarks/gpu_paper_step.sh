#!/usr/bin/env bash
# Device calls: the reference recipe, the paper preset, its levers and lean switches, the
# 24 GB preset, reply latency and sharded training, at paper scale on the same GPU.
#
# Prepare here (CPU machine, once):   bash benchmarks/gpu_paper_step.sh prepare
#   → .gpu/wheels  what the GPU machine lacks (diffusers, pluggy, typer, pydantic, bitsandbytes,
#                  torchao, deepspeed built here as a pure-Python wheel, and their small
#                  dependencies) and the peft tested here; it has torch, transformers ≥ 5.17
#                  (checked here too), accelerate
#   → .gpu/cache   the 32k-token BPE, the CLIP tokenizer and their vocabulary map
#   → .gpu/tools   the standalone reference-recipe script of the tool/tool16 stages, copied from
#                  $REFERENCE_TOOL when set (it is not part of this repository)
# Run there (device tool, carry [".gpu"]):  bash benchmarks/gpu_paper_step.sh run [STAGE...]
# Each stage writes $OUT/<row>.json as soon as its row is measured, plus log.txt. Their time
# limits add up to more than one 600 s device call: name the stages of each call.
#   call 1 (training, ~9 min):  ref paper levers lean 24gb
#   call 2 (replies, sharding): reply strategies
#   call 3 (the loop, ~6 min):  paper loop
# Stages:
#   ref        the reference recipe through mmdialog.build, micro-batch 4, an optimizer step per
#              micro-batch as in the measured table
#   paper      the paper preset: micro-batch 16, every LLM layer and UNet block checkpointed,
#              compiled, bf16 autocast (the row to beat)
#   levers     same numerics: the frozen encoders offloaded once cached, then the memory spent on
#              less recompute (every 2nd LLM layer, the outer UNet blocks, the compiler's activation
#              budget), and save_matmuls selective checkpointing (eager)
#   lean       the lean switches, each a row: 8-bit UNet moments, the base in NF4 / int8, float8 matmuls
#   24gb       the paper-24gb preset's settings (NF4 base, 8-bit moments, offload, 8 × 2)
#   reply      bench_paper_reply.py: time to first token / text / photo, 1 and 8 sessions, baseline
#   strategies bench_strategies.py: 3 steps through mmdialog.train with auto, fsdp, deepspeed
#   loop       bench_paper_loop.py: the real `mmdialog train` loop (loader workers, feature store,
#              Lightning) at the paper row's shapes on synthetic 1024×768 JPEG dialogues, from a cold
#              and a warm store; compare its loop_dialogues_per_s with paper.json's (goal ≥ 95 %)
#   tool, tool16, sweep, compiled, lora, autocast: the earlier rows (benchmarks/results/h100-2026-11-26)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-run}" in
prepare)
  rm -rf .gpu && mkdir -p .gpu/wheels .gpu/cache .gpu/tools
  .venv/bin/pip download -q --no-deps -d .gpu/wheels --python-version 3.12 --only-binary=:all: \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_28_x86_64 \
    diffusers==0.42.1 peft==0.21.2 pluggy typer shellingham pydantic==2.14.4 \
    "pydantic_core==$(.venv/bin/python -c 'import pydantic_core; print(pydantic_core.__version__)')" \
    annotated_types typing_inspection typing_extensions \
    "bitsandbytes==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("bitsandbytes"))')" \
    "torchao==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("torchao"))')" \
    einops hjson msgpack ninja py-cpuinfo
  # DeepSpeed ships as a source archive; without its CUDA ops (built on first use) it is pure Python.
  DS_BUILD_OPS=0 .venv/bin/pip wheel -q --no-deps --no-build-isolation -w .gpu/wheels deepspeed==0.19.8
  # Build the tokenizers and the static map once, then ship the cache folder.
  MMDIALOG_CACHE="$PWD/.gpu/cache" .venv/bin/python benchmarks/bench_paper_step.py --scale tiny --device cpu \
    --micro-batch 1 --accumulate 1 --steps 1 >/dev/null
  rm -rf .gpu/cache/smollm2-135m-instruct  # 260 MB; the GPU run needs only the derived tokenizer
  [ -z "${REFERENCE_TOOL:-}" ] || cp "$REFERENCE_TOOL" .gpu/tools/paper_scale_step.py
  du -sh .gpu
  ;;
run)
  shift || true
  stages=("$@"); [ ${#stages[@]} -gt 0 ] || stages=(ref paper levers lean 24gb)
  export PYTHONPATH="/tmp/mmdialog-deps:$PWD" MMDIALOG_CACHE="$PWD/.gpu/cache" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
  python3 -m pip install -q --no-index --no-deps --target /tmp/mmdialog-deps .gpu/wheels/*.whl
  OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
  exec > >(tee "$OUT/log.txt") 2>&1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch, transformers, diffusers, peft, pydantic, mmdialog; \
print(torch.__version__, transformers.__version__, diffusers.__version__, peft.__version__, pydantic.__version__)"
  bench=(python3 benchmarks/bench_paper_step.py --scale paper)
  # Our rows at 16 dialogues per step, compiled, frozen encoders offloaded once cached.
  ours=("${bench[@]}" --sweep --compile --offload --steps 3 --warmup 2)
  mb16=16:1:all,16:0:none,16:1:outer,16:2:all,16:0:all,16:1:none,16:2:outer
  for stage in "${stages[@]}"; do
    echo "== $stage"
    case $stage in
      paper) timeout 120 "${bench[@]}" --steps 3 --warmup 2 --json "$OUT/paper.json" | tail -3 ;;
      levers) timeout 150 "${ours[@]}" --settings 16:1:all,16:2:all,16:1:outer,16:2:outer --json "$OUT/offload.json" \
                2>&1 | grep '^{"llm'
              timeout 90 "${ours[@]}" --activation-memory-budget 0.5 --settings 16:0:none \
                --json "$OUT/memory_budget.json" 2>&1 | grep '^{"llm'
              timeout 90 "${bench[@]}" --sweep --no-compile --offload --checkpoint-policy save_matmuls --steps 3 \
                --warmup 1 --settings 16:1:all --json "$OUT/save_matmuls.json" 2>&1 | grep '^{"llm' ;;
      lean) timeout 110 "${ours[@]}" --optimizer adamw8bit --settings 16:1:all,16:2:all --json "$OUT/adamw8bit.json" \
              2>&1 | grep '^{"llm'
            for q in nf4 int8; do
              timeout 110 "${ours[@]}" --base-quantization $q --settings 16:1:all,16:2:all,16:0:all \
                --json "$OUT/base_$q.json" 2>&1 | grep '^{"llm'
            done
            timeout 110 "${ours[@]}" --float8-matmul --optimizer adamw8bit --settings 16:1:all,16:2:all \
              --json "$OUT/float8_matmul.json" 2>&1 | grep '^{"llm' ;;
      24gb) timeout 120 "${bench[@]}" --compile --offload --optimizer adamw8bit --base-quantization nf4 \
              --micro-batch 8 --accumulate 2 --steps 3 --warmup 2 --json "$OUT/paper_24gb.json" | tail -3 ;;
      reply) timeout 420 python3 benchmarks/bench_paper_reply.py --scale paper --device cuda --repeats 2 --warmup 1 \
               --json "$OUT/reply.json" | tail -5 ;;
      strategies) for s in auto fsdp deepspeed; do
                    timeout 180 python3 benchmarks/bench_strategies.py --scale paper --strategy $s \
                      --json "$OUT/strategy_$s.json" 2>&1 | tail -4
                  done ;;
      loop) timeout 420 python3 benchmarks/bench_paper_loop.py --scale paper --steps 6 --warmup 2 \
              --json "$OUT/loop.json" | tail -1 ;;
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
      *) echo "unknown stage $stage (ref paper levers lean 24gb reply strategies loop tool tool16 sweep compiled lora" \
              "autocast)"; exit 2 ;;
    esac || echo "$stage: exit $?"
  done
  ;;
esac
