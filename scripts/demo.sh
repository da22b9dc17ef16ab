#!/usr/bin/env bash
# The whole RAFT recipe on a laptop CPU, end to end, with the embedded SmolLM2-135M-Instruct as teacher, student,
# baseline and judge. It shows the mechanics, not the quality: a 135M model is far too small to be a good teacher.
#
#   make demo                 # about 6 to 8 minutes on 2 cores after `make setup` (README: measured stage times)
#   make demo DEMO_ARGS=--quick   # a few questions and steps: about 4 minutes (the CI test runs this)
#
# Stages (each logs to $DEMO_DIR/logs/<stage>.log; a finished stage is reused when the script runs again with the
# same settings, and a stage that runs again makes every later stage run again):
#   1 teacher    llama-server serves the base SmolLM2 (port $DEMO_TEACHER_PORT, 8 requests at once); it is also the
#                baseline and the judge
#   2 generate   raft.py writes RAFT data from data/ with it
#   3 finetune   torchrun, 2 CPU processes, FSDP2: full fine-tune of SmolLM2 (from its GGUF) for a few steps
#   4 convert    the sharded checkpoint -> a Hugging Face folder and a GGUF file
#   5 student    llama-server serves the fine-tuned GGUF (port $DEMO_STUDENT_PORT)
#   6 evaluate   raft_eval.py: fine-tuned vs base, without and with retrieval, judged by the base model
#   7 report     where the report is, and how to chat with the fine-tuned model
# Every server the script started is stopped when it ends, however it ends.
#
# Environment: DEMO_DIR [output/demo], DEMO_TEACHER_PORT [8001], DEMO_STUDENT_PORT [8002].
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
DIR="${DEMO_DIR:-output/demo}"
TEACHER_PORT="${DEMO_TEACHER_PORT:-8001}"
STUDENT_PORT="${DEMO_STUDENT_PORT:-8002}"
PY=.venv/bin/python
BASE_MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
BASE_NAME=smollm2-135m-instruct
STUDENT_NAME=raft-smollm2

# Sized to finish in under 25 minutes on 2 cores without bf16 units, where fine-tuning computes in float32
# (README: the measured stage times on both kinds of CPU). 500-character chunks (the recipe's 1000 is the
# default of raft.py) make RAFT rows of about 900 tokens instead of 1,500, which nearly halves every stage: the
# teacher's prompts, the training rows and the evaluation's RAG prompts.
CHUNK_SIZE=500
if (( QUICK )); then   # chunks asked about, questions per chunk, epochs, step cap, eval questions, top-k, answer tokens
  CHUNKS=6; PER_CHUNK=2; EPOCHS=1; STEPS=4; QUESTIONS=3; TOPK=2; ANSWER_TOKENS=96
else
  CHUNKS=12; PER_CHUNK=2; EPOCHS=2; STEPS=24; QUESTIONS=20; TOPK=3; ANSWER_TOKENS=256
fi

mkdir -p "$DIR/logs"
started_servers=()
stop_servers() {
  for port in "${started_servers[@]}"; do
    TEACHER_PORT="$port" scripts/teacher.sh stop >/dev/null 2>&1 || true
  done
}
trap stop_servers EXIT
trap 'echo "[demo] interrupted: run it again to go on where it stopped" >&2; exit 130' INT TERM

# start_server PORT MODEL ALIAS: start llama.cpp unless it already runs there (then it is left running at the end).
start_server() {
  if TEACHER_PORT="$1" scripts/teacher.sh status >/dev/null 2>&1; then
    echo "[demo]   a server already runs on port $1: using it"
  else
    TEACHER_PORT="$1" TEACHER_MODEL="$2" TEACHER_ALIAS="$3" scripts/teacher.sh start
    started_servers+=("$1")
  fi
}

# stage NAME SETTINGS COMMAND...: run COMMAND unless the stage finished before with the same SETTINGS and no
# earlier stage ran again. Output goes to the stage's log; a failure names the stage and the log.
upstream_changed=0
stage_number=0
demo_started=$SECONDS
stage() {
  local name="$1" settings="$2" log="$DIR/logs/$1.log" stamp="$DIR/logs/$1.done"
  shift 2
  stage_number=$((stage_number + 1))
  if (( ! upstream_changed )) && [[ -f "$stamp" && "$(cat "$stamp")" == "$settings" ]]; then
    echo "[demo] $stage_number/7 $name: reused (finished before with the same settings)"
    return 0
  fi
  echo "[demo] $stage_number/7 $name: $settings"
  local t0=$SECONDS
  if ! "$@" >"$log" 2>&1; then
    echo "[demo] stage '$name' failed; the last lines of its log, $log:" >&2
    tail -n 15 "$log" >&2
    exit 1
  fi
  echo "$settings" >"$stamp"
  upstream_changed=1
  echo "[demo]   done in $((SECONDS - t0)) s (log: $log)"
}

teacher_url="http://127.0.0.1:$TEACHER_PORT/v1"
student_url="http://127.0.0.1:$STUDENT_PORT/v1"

# bf16 where this CPU multiplies it natively (AMX, AVX512-BF16), float32 elsewhere: the trainer, the converter's
# consumers and the retriever all decide it the same way (hardware.py).
echo "[demo] this machine computes in $("$PY" hardware.py)"

stage_number=1
echo "[demo] 1/7 teacher: llama.cpp with $BASE_MODEL on port $TEACHER_PORT"
start_server "$TEACHER_PORT" "$BASE_MODEL" "$BASE_NAME"

stage generate "raft.py -t $PER_CHUNK --max_chunks $CHUNKS --chunk_size $CHUNK_SIZE" \
  "$PY" raft.py -u "$teacher_url" -k EMPTY -m "$BASE_NAME" -t "$PER_CHUNK" --max_chunks "$CHUNKS" \
    --chunk_size "$CHUNK_SIZE" -o "$DIR/data"

# The recipe is finetune/configs/cpu_demo.yaml (padding, one row per process and step, lr 3e-5, --resume); the flags
# give what this script varies. --resume continues an interrupted run; new data starts a new one.
(( upstream_changed )) && rm -rf "$DIR/checkpoints"
stage finetune "$EPOCHS epochs of at most $STEPS steps, 2 processes" \
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 finetune/finetuning.py \
    --config finetune/configs/cpu_demo.yaml --model_name "$BASE_MODEL" --data_path "$DIR/data/raft.jsonl" \
    --num_epochs "$EPOCHS" --max_steps "$STEPS" \
    --dist_checkpoint_root_folder "$DIR/checkpoints" --dist_checkpoint_folder "$STUDENT_NAME"

stage convert "Hugging Face folder + GGUF q8_0" \
  "$PY" finetune/checkpoint_converter.py --fsdp_checkpoint_path "$DIR/checkpoints/$STUDENT_NAME" \
    --consolidated_model_path "$DIR/$STUDENT_NAME-hf" --gguf "$DIR/$STUDENT_NAME.gguf" --gguf_outtype q8_0

stage_number=5
echo "[demo] 5/7 student: llama.cpp with $DIR/$STUDENT_NAME.gguf on port $STUDENT_PORT"
start_server "$STUDENT_PORT" "$DIR/$STUDENT_NAME.gguf" "$STUDENT_NAME"

# The student's revision is its GGUF's checksum: a retrained student, served under the same name from the same
# path, is never answered from the cache of the one before (raft_eval.py keys its cache by it).
student_revision="$(sha256sum "$DIR/$STUDENT_NAME.gguf" | cut -c1-16)"
stage evaluate "$QUESTIONS questions, top-$TOPK, $ANSWER_TOKENS answer tokens, chunks of $DIR/data" \
  "$PY" raft_eval.py -m "$STUDENT_NAME" -u "$student_url" --baseline "$BASE_NAME=$teacher_url" \
    -j "$teacher_url" --judge_model "$BASE_NAME" -r "$TOPK" --limit "$QUESTIONS" --max_tokens "$ANSWER_TOKENS" \
    --raft_run "$DIR/data" --model_revision "$student_revision" \
    -o "$DIR/eval"

stop_servers
started_servers=()
echo "[demo] 7/7 report, after $((SECONDS - demo_started)) s:"
# The evaluation's summary: the judge's calibration, the systems with their 95% intervals, the comparisons.
awk '/^(\*\*)?(WARNING|judge calibration)/ {on = 1} /^answer support/ {on = 0} on' "$DIR/logs/evaluate.log"
echo
echo "  data:     $DIR/data/data_card.md (what the quality filters kept and dropped: $DIR/data/filtered_out.jsonl)"
echo "  report:   $DIR/eval/report.md (plots beside it; every answer in $DIR/eval/questions.jsonl)"
echo "  training: $DIR/checkpoints/$STUDENT_NAME/metrics.json and loss.png"
echo "  chat with the fine-tuned model on a web page (http://127.0.0.1:7860; no server needed):"
echo "    $PY chat.py --model_path $DIR/$STUDENT_NAME-hf --raft_run $DIR/data --web"
echo "  or serve its GGUF (several people at once) and chat in the terminal, or offer it as an OpenAI-style API:"
echo "    TEACHER_PORT=$STUDENT_PORT TEACHER_MODEL=$DIR/$STUDENT_NAME.gguf TEACHER_ALIAS=$STUDENT_NAME scripts/teacher.sh start"
echo "    $PY chat.py -u $student_url --raft_run $DIR/data            # add --web, or --serve for the API"
