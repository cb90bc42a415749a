#!/usr/bin/env bash
# What `make train-mini` runs on a GPU box: train terrascope-mini from scratch and export it to
# resources/models/terrascope-mini (bf16 safetensors shards < 16 MiB). See docs/TRAINING.md.
#
#   scripts/train_mini_gpu.sh [extra model.train args]
# Environment:
#   PY=python3            interpreter with torch, transformers, peft, tokenizers, pillow, matplotlib, tqdm
#   PACK=.carry/terra-cot-pack   packed dataset; built here if missing (needs rasterio + EO_SAMPLES)
#   EO_SAMPLES=...        the eo-samples folder (only when the pack must be built)
#   TIME_BUDGET_S=360     wall-clock budget of phase 1 (configs/terrascope-mini.json: stages 1-2)
#   CONTINUE_BUDGET_S=270 wall-clock budget of phase 2 (configs/terrascope-mini-continue.json: stage 2b +
#                         stage 3 with frozen, cached encoders), which starts from phase 1's export
#   SEG_BUDGET_S=480      wall-clock budget of phase 3 (configs/terrascope-mini-seg.json: SAM-2 on RES pairs
#                         with flips/rot90, then stage 5 with frozen, cached encoders), from the current export
#   AUG_BUDGET_S=460      wall-clock budget of phase 4 (configs/terrascope-mini-seg-aug.json: phase 3 with
#                         scale crops and radiometric jitter of the SAM-2 inputs), from the current export
#   COPY_BUDGET_S=450     wall-clock budget of phase 5 (configs/terrascope-mini-copy.json: cached SFT whose
#                         traces restate the jittered span's value), from the current export
#   OPTIONS_BUDGET_S=500 wall-clock budget of phase 6 (configs/terrascope-mini-options.json: cached SFT with
#                         fresh options per draw, options listed, the one nearest the jittered span named), from the
#                         current export
#   OPTIONS2_BUDGET_S=500 wall-clock budget of phase 7 (configs/terrascope-mini-options2.json: phase 6's recipe
#                         again, more RES pairs), from the current export
#   MARKS_BUDGET_S=500   wall-clock budget of phase 8 (configs/terrascope-mini-options-marks.json: option
#                         redraw with above/below marks, balanced sampling), from the current export
#   NOTES_BUDGET_S=500   wall-clock budget of phase 9 (configs/terrascope-mini-answer-notes.json: cached SFT
#                         on spans that carry the measured answer, from phase 4; needs a pack built from a
#                         dataset run through model.data.answer_notes)
#   NOTES_LLM_BUDGET_S=240 wall-clock budget of phase 10 (configs/terrascope-mini-answer-notes-llm.json: phase 9
#                         with only the LLM trained, from phase 4)
#   NOTES_FROZEN_BUDGET_S=400 wall-clock budget of phase 11 (configs/terrascope-mini-answer-notes-frozen-sam.json:
#                         phase 9 with SAM-2 and the seg projector frozen, from phase 4)
#   MORE_BUILDINGS_BUDGET_S=450 wall-clock budget of phase 12 (configs/terrascope-mini-more-buildings.json: phase
#                         4's SAM-2 stages with the LLM frozen, on a pack with the fAIr / ramp tiles of
#                         model.data.extra --ramp), from phase 11
#   DECODER_BUDGET_S=330  wall-clock budget of phase 13 (configs/terrascope-mini-more-buildings-decoder.json: only
#                         the mask decoder side on phase 12's pack, encoders cached, LLM frozen), from phase 11
#   RAMP=...              ramp-data/TRAIN/HOTOSM/2 of hotosm/fAIr-utilities @ d83e21c (only when the pack must
#                         be built: its tiles join the train split)
#   PHASES="1 2 3 4 11"   which phases to run (each continues from the previous export; phase 3 uses the
#                         extra fAIr tiles that model.data.extra adds to the pack, see docs/TRAINING.md)
#   NPROC=1               GPUs: >1 runs torchrun (DDP), one process a GPU
#   ARTEFACTS=            if set: copy the model, log, plot and summary there as <= 8 files (device runs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
CONFIG=${CONFIG:-configs/terrascope-mini.json}
PACK=${PACK:-.carry/terra-cot-pack}
BUDGET=${TIME_BUDGET_S:-360}
CONTINUE_BUDGET=${CONTINUE_BUDGET_S:-270}
SEG_BUDGET=${SEG_BUDGET_S:-480}
AUG_BUDGET=${AUG_BUDGET_S:-460}
COPY_BUDGET=${COPY_BUDGET_S:-450}
OPTIONS_BUDGET=${OPTIONS_BUDGET_S:-500}
OPTIONS2_BUDGET=${OPTIONS2_BUDGET_S:-500}
MARKS_BUDGET=${MARKS_BUDGET_S:-500}
NOTES_BUDGET=${NOTES_BUDGET_S:-500}
NOTES_LLM_BUDGET=${NOTES_LLM_BUDGET_S:-240}
NOTES_FROZEN_BUDGET=${NOTES_FROZEN_BUDGET_S:-400}
MORE_BUILDINGS_BUDGET=${MORE_BUILDINGS_BUDGET_S:-450}
DECODER_BUDGET=${DECODER_BUDGET_S:-330}
PHASES=${PHASES:-1 2 3 4 11}
NPROC=${NPROC:-1}
SAVE=${SAVE_DIR:-resources/models/terrascope-mini}
RUN=${RUN_DIR:-out/terrascope-mini}
export PYTHONUNBUFFERED=1

if [ ! -f "$PACK/train.jsonl" ] && [ ! -f "$PACK/train.jsonl.gz" ]; then
  DATA=${DATA:-data/terra-cot}
  if [ ! -f "$DATA/train.jsonl" ]; then
    "$PY" -m model.data.build --src "${EO_SAMPLES:?the pack $PACK is missing: set EO_SAMPLES to build it}" \
      --out "$DATA" --seed 0
    "$PY" -m model.data.extra --src "$EO_SAMPLES" --data "$DATA" --l1-per-tile 2
    if [ -n "${RAMP:-}" ]; then "$PY" -m model.data.extra --ramp "$RAMP" --data "$DATA" --l1-per-tile 2; fi
  fi
  "$PY" -m model.training.pack --data "$DATA" --out "$PACK" --format jpg --quality 80 --val-limit 64 --gzip
fi

"$PY" - <<'PYEOF'
import torch, transformers, peft, tokenizers
print(f"torch {torch.__version__} cuda {torch.cuda.is_available()} "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''} transformers {transformers.__version__} "
      f"peft {peft.__version__} tokenizers {tokenizers.__version__}", flush=True)
PYEOF

collect() {  # device runs: whatever exists comes back, even after a failure
  [ -n "${ARTEFACTS:-}" ] || return 0
  mkdir -p "$ARTEFACTS"
  if [ -d "$SAVE" ]; then cp "$SAVE"/model*.safetensors "$ARTEFACTS"/ 2>/dev/null || true; fi
  local files=()
  for f in "$SAVE"/*.json "$RUN"/train_log.jsonl "$RUN"/train_log.csv "$RUN"/train_loss.png "$RUN"/summary.json; do
    [ -f "$f" ] && files+=("$f")
  done
  [ "${#files[@]}" -gt 0 ] && tar -cf "$ARTEFACTS/meta.tar" --transform 's|.*/||' "${files[@]}"
  ls -la "$ARTEFACTS"
}
trap collect EXIT

train() {  # config budget run-dir [extra args]
  local config=$1 budget=$2 run=$3
  shift 3
  local args=("$config" --data "$PACK" --out "$run" --save-dir "$SAVE" --time-budget-s "$budget" --no-progress "$@")
  if [ "$NPROC" -gt 1 ]; then
    NCCL_NVLS_ENABLE=0 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m model.train "${args[@]}"
  else
    "$PY" -m model.train "${args[@]}"
  fi
}
for phase in $PHASES; do
  case $phase in
    1) RUN=${RUN_DIR:-out/terrascope-mini}; train "$CONFIG" "$BUDGET" "$RUN" "$@" ;;
    2) RUN=${RUN_DIR:-out/terrascope-mini}-continue; train configs/terrascope-mini-continue.json "$CONTINUE_BUDGET" "$RUN" --init-from "$SAVE" "$@" ;;
    3) RUN=${RUN_DIR:-out/terrascope-mini}-seg; train configs/terrascope-mini-seg.json "$SEG_BUDGET" "$RUN" --init-from "$SAVE" "$@" ;;
    4) RUN=${RUN_DIR:-out/terrascope-mini}-seg-aug; train configs/terrascope-mini-seg-aug.json "$AUG_BUDGET" "$RUN" --init-from "$SAVE" "$@" ;;
    5) RUN=${RUN_DIR:-out/terrascope-mini}-copy; train configs/terrascope-mini-copy.json "$COPY_BUDGET" "$RUN" --init-from "$SAVE" "$@" ;;
    6) RUN=${RUN_DIR:-out/terrascope-mini}-options; train configs/terrascope-mini-options.json "$OPTIONS_BUDGET" "$RUN" --init-from "$SAVE" "$@" ;;
    7) RUN=${RUN_DIR:-out/terrascope-mini}-options2; train configs/terrascope-mini-options2.json "$OPTIONS2_BUDGET" "$RUN" --init-from "$SAVE" "$@" ;;
    8) RUN=${RUN_DIR:-out/terrascope-mini}-options-marks; train configs/terrascope-mini-options-marks.json "$MARKS_BUDGET" "$RUN" --init-from "$SAVE" "$@" ;;
    9) RUN=${RUN_DIR:-out/terrascope-mini}-answer-notes; train configs/terrascope-mini-answer-notes.json "$NOTES_BUDGET" "$RUN" --init-from "$SAVE" "$@" ;;
    10) RUN=${RUN_DIR:-out/terrascope-mini}-answer-notes-llm; train configs/terrascope-mini-answer-notes-llm.json "$NOTES_LLM_BUDGET" "$RUN" --init-from "$SAVE" "$@" ;;
    11) RUN=${RUN_DIR:-out/terrascope-mini}-answer-notes-frozen-sam; train configs/terrascope-mini-answer-notes-frozen-sam.json "$NOTES_FROZEN_BUDGET" "$RUN" --init-from "$SAVE" "$@" ;;
    12) RUN=${RUN_DIR:-out/terrascope-mini}-more-buildings; train configs/terrascope-mini-more-buildings.json "$MORE_BUILDINGS_BUDGET" "$RUN" --init-from "$SAVE" "$@" ;;
    13) RUN=${RUN_DIR:-out/terrascope-mini}-more-buildings-decoder; train configs/terrascope-mini-more-buildings-decoder.json "$DECODER_BUDGET" "$RUN" --init-from "$SAVE" "$@" ;;
    *) echo "unknown phase $phase" >&2; exit 2 ;;
  esac
done
