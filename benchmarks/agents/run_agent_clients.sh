#!/usr/bin/env bash
# Run the real agent CLIs (Claude Code, Codex) for one turn each against `mtplx serve`.
#
#   benchmarks/agents/run_agent_clients.sh
#
# What it does
#   1. Installs @anthropic-ai/claude-code and @openai/codex from npm into a cache folder
#      (MTPLX_AGENTS_CACHE, default ~/.cache/mtplx-agents) unless they are already there.
#   2. Re-runs itself inside a loopback-only network namespace (`unshare -n`, loopback up),
#      so the CLIs can reach nothing but the local server (no telemetry, no real API).
#   3. Starts `python -m mtplx serve --port PORT --depth 2 --max-tokens 256 $MTPLX_SERVE_ARGS`,
#      waits for GET /health, reads the served model id from GET /v1/models.
#   4. Runs `claude -p PROMPT` (ANTHROPIC_BASE_URL, Anthropic Messages API) and
#      `codex exec PROMPT` (custom model provider, wire_api = "responses", i.e. POST
#      /v1/responses), each once with a timeout, printing their output and exit code.
#   5. Stops the server and prints the tail of its log.
#
# Success means each CLI completed a turn and exited 0; with the tiny embedded default model
# the text itself is poor. Exit status: 0 if both clients exited 0, else 1 (2: setup failed).
#
# Slim mode. Out of the box the CLIs send big prompts (measured with the default model's
# tokenizer: Claude Code ~28k tokens, 24 tools, max_tokens 32000; Codex ~14k tokens, 9 tools)
# which the embedded default model's 65536 positions hold, but which take it a while to
# prefill on a small CPU and which it was not trained on. Slim mode trims them
# (~1.1k / ~2.8k tokens) while keeping one tool-calling turn: Claude Code gets --bare, a short
# --system-prompt, --tools Bash (not pre-approved, so a Bash call is answered "permission
# denied" and the turn goes on) and CLAUDE_CODE_MAX_OUTPUT_TOKENS=256; Codex gets a short
# model_instructions_file, no skills, no web_search / view_image / multi-agent / goals tools.
# MTPLX_AGENTS_SLIM=auto (default) turns it on unless MTPLX_SERVE_ARGS names a --model.
#
# Environment (all optional)
#   MTPLX_AGENTS_CACHE        npm cache/install folder        (~/.cache/mtplx-agents)
#   MTPLX_CLAUDE_CODE_VERSION npm version of claude-code      (2.1.197; "latest" allowed)
#   MTPLX_CODEX_VERSION       npm version of codex            (0.171.0; "latest" allowed)
#   MTPLX_PYTHON              python with mtplx installed     (<repo>/.venv/bin/python, else python3)
#   MTPLX_SERVE_ARGS          extra args for `mtplx serve`, word-split (e.g. "--model DIR --threads 8")
#   MTPLX_AGENTS_PORT         server port                     (18765)
#   MTPLX_AGENTS_TIMEOUT      seconds per client run          (600)
#   MTPLX_AGENTS_STARTUP_TIMEOUT  seconds to wait for /health (600)
#   MTPLX_AGENTS_PROMPT       prompt given to both clients    ("Say hi in one short sentence.")
#   MTPLX_AGENTS_CLIENTS      which clients to run            ("claude codex")
#   MTPLX_AGENTS_WORKDIR      scratch folder (kept)           (mktemp -d)
#   MTPLX_AGENTS_SLIM         auto | 1 | 0 (see above)        (auto)
#   MTPLX_AGENTS_NO_NETNS=1   do not isolate the network (only if unshare is impossible)
#   MTPLX_AGENTS_SERVER       real | fake: `fake` serves the deterministic stand-in model of the
#                             tests (full-size prompts fit, every turn ends after 40 tokens), to
#                             check the protocol with both CLIs whatever the model can do  (real)
set -euo pipefail

SCRIPT_PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO_ROOT="$(cd "$(dirname "$SCRIPT_PATH")/../.." && pwd)"

CACHE="${MTPLX_AGENTS_CACHE:-$HOME/.cache/mtplx-agents}"
CLAUDE_VERSION="${MTPLX_CLAUDE_CODE_VERSION:-2.1.197}"
CODEX_VERSION="${MTPLX_CODEX_VERSION:-0.171.0}"
PORT="${MTPLX_AGENTS_PORT:-18765}"
CLIENT_TIMEOUT="${MTPLX_AGENTS_TIMEOUT:-600}"
STARTUP_TIMEOUT="${MTPLX_AGENTS_STARTUP_TIMEOUT:-600}"
PROMPT="${MTPLX_AGENTS_PROMPT:-Say hi in one short sentence.}"
CLIENTS="${MTPLX_AGENTS_CLIENTS:-claude codex}"
SLIM="${MTPLX_AGENTS_SLIM:-auto}"
if [[ "$SLIM" == auto ]]; then
    if [[ " ${MTPLX_SERVE_ARGS:-} " =~ [[:space:]]--model([[:space:]=]) ]]; then SLIM=0; else SLIM=1; fi
fi
if [[ -n "${MTPLX_PYTHON:-}" ]]; then
    PY="$MTPLX_PYTHON"
elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
    PY="$REPO_ROOT/.venv/bin/python"
else
    PY="$(command -v python3)"
fi
CLAUDE="$CACHE/node_modules/.bin/claude"
CODEX="$CACHE/node_modules/.bin/codex"

log() { printf '[run_agent_clients] %s\n' "$*" >&2; }

# --------------------------------------------------------------------------- outer: install
install_clients() {
    command -v npm >/dev/null || { log "npm not found; install Node.js >= 18"; exit 2; }
    mkdir -p "$CACHE"
    local want=()
    [[ -x "$CLAUDE" ]] && "$CLAUDE" --version >/dev/null 2>&1 || want+=("@anthropic-ai/claude-code@$CLAUDE_VERSION")
    [[ -x "$CODEX" ]] && "$CODEX" --version >/dev/null 2>&1 || want+=("@openai/codex@$CODEX_VERSION")
    if ((${#want[@]})); then
        log "npm install --prefix $CACHE ${want[*]}"
        [[ -f "$CACHE/package.json" ]] || echo '{"name":"mtplx-agents","private":true}' > "$CACHE/package.json"
        (cd "$CACHE" && npm install --no-audit --no-fund --prefix "$CACHE" "${want[@]}") >&2
    fi
    # claude-code's postinstall copies the native binary over a stub; newer npm versions may
    # skip install scripts, so run it by hand when the stub is still in place.
    if ! "$CLAUDE" --version >/dev/null 2>&1; then
        log "running claude-code postinstall by hand"
        (cd "$CACHE/node_modules/@anthropic-ai/claude-code" && node install.cjs) >&2
    fi
    log "claude: $("$CLAUDE" --version 2>&1 | head -1)"
    log "codex:  $("$CODEX" --version 2>&1 | head -1)"
}

# --------------------------------------------------------------------------- inner helpers
loopback_up() {
    if command -v ip >/dev/null; then
        ip link set lo up
    else  # no iproute2: SIOCSIFFLAGS by hand
        "$PY" - <<'EOF'
import fcntl, socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ifr = struct.pack("16sH14s", b"lo", 0, b"")
flags = struct.unpack("16sH14s", fcntl.ioctl(s, 0x8913, ifr))[1]  # SIOCGIFFLAGS
fcntl.ioctl(s, 0x8914, struct.pack("16sH14s", b"lo", flags | 0x1, b""))  # SIOCSIFFLAGS IFF_UP
EOF
    fi
}

http_get() {  # http_get URL -> body on stdout, non-zero exit unless HTTP 200
    "$PY" - "$1" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        sys.stdout.write(r.read().decode())
except Exception:
    sys.exit(1)
EOF
}

SERVER_PID=""
stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}

run_client() {  # run_client NAME CMD... ; prints output and exit code, returns the code
    local name="$1"; shift
    local out="$WORK/$name.out" err="$WORK/$name.err" rc=0
    log "running $name (timeout ${CLIENT_TIMEOUT}s)"
    local t0=$SECONDS
    timeout -k 10 "$CLIENT_TIMEOUT" "$@" >"$out" 2>"$err" </dev/null || rc=$?
    echo "===== $name: exit code $rc ($((SECONDS - t0))s)$([[ $rc == 124 ]] && echo ', TIMED OUT')"
    echo "----- $name stdout"
    cat "$out"
    echo "----- $name stderr (last 40 lines)"
    tail -n 40 "$err"
    echo "====="
    return "$rc"
}

inner() {
    WORK="${MTPLX_AGENTS_WORKDIR:-$(mktemp -d -t mtplx-agents.XXXXXX)}"
    mkdir -p "$WORK"
    log "scratch folder: $WORK"
    loopback_up
    local base="http://127.0.0.1:$PORT"

    # ---- server
    local -a serve_args=(--port "$PORT" --depth 2 --max-tokens 256)
    local -a module=(mtplx serve)
    if [[ "${MTPLX_AGENTS_SERVER:-real}" == fake ]]; then  # the protocol alone: a model that ends its turns
        module=(mtplx.server.fake)
        serve_args=(--port "$PORT" --depth 2 --max-context 200000 --eos-after 40 --log-level info)
    fi
    # shellcheck disable=SC2206  # word splitting of MTPLX_SERVE_ARGS is intended
    [[ -n "${MTPLX_SERVE_ARGS:-}" ]] && serve_args+=(${MTPLX_SERVE_ARGS})
    log "starting: $PY -m ${module[*]} ${serve_args[*]}"
    (cd "$REPO_ROOT" && exec "$PY" -m "${module[@]}" "${serve_args[@]}") >"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    trap 'stop_server' EXIT
    local t0=$SECONDS
    until http_get "$base/health" >/dev/null; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            log "server exited during startup; log:"; tail -n 60 "$WORK/server.log" >&2; exit 2
        fi
        if ((SECONDS - t0 > STARTUP_TIMEOUT)); then
            log "no /health after ${STARTUP_TIMEOUT}s; log:"; tail -n 60 "$WORK/server.log" >&2; exit 2
        fi
        sleep 1
    done
    local model
    model="$(http_get "$base/v1/models" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')"
    log "server up after $((SECONDS - t0))s, model id: $model, slim mode: $SLIM"

    local rc_claude=skipped rc_codex=skipped
    # ---- Claude Code: Anthropic Messages API
    if [[ " $CLIENTS " == *" claude "* ]]; then
        mkdir -p "$WORK/claude-home" "$WORK/claude-work"
        local -a claude_args=(-p "$PROMPT" --model "$model") claude_env=()
        if [[ "$SLIM" == 1 ]]; then
            claude_args+=(--bare --system-prompt "You are a coding agent. Answer briefly."
                          --tools Bash --disable-slash-commands)
            claude_env+=(CLAUDE_CODE_MAX_OUTPUT_TOKENS="${CLAUDE_CODE_MAX_OUTPUT_TOKENS:-256}")
        fi
        rc_claude=0
        (cd "$WORK/claude-work" && run_client claude env "${claude_env[@]}" \
            HOME="$WORK/claude-home" \
            ANTHROPIC_BASE_URL="$base" ANTHROPIC_API_KEY="${MTPLX_API_KEY:-dummy}" \
            ANTHROPIC_MODEL="$model" ANTHROPIC_SMALL_FAST_MODEL="$model" \
            ANTHROPIC_DEFAULT_OPUS_MODEL="$model" ANTHROPIC_DEFAULT_SONNET_MODEL="$model" \
            ANTHROPIC_DEFAULT_HAIKU_MODEL="$model" \
            DISABLE_TELEMETRY=1 DISABLE_AUTOUPDATER=1 DISABLE_ERROR_REPORTING=1 \
            CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 \
            "$CLAUDE" "${claude_args[@]}") || rc_claude=$?
    fi

    # ---- Codex: OpenAI Responses API via a custom provider
    if [[ " $CLIENTS " == *" codex "* ]]; then
        mkdir -p "$WORK/codex-home" "$WORK/codex-work" "$WORK/codex-cfg"
        local slim_toml=""
        if [[ "$SLIM" == 1 ]]; then
            printf '%s\n' "You are a coding agent. Answer briefly. Use the exec_command tool to run" \
                "shell commands when needed." >"$WORK/codex-cfg/instructions.md"
            slim_toml="model_instructions_file = \"$WORK/codex-cfg/instructions.md\"
web_search = \"disabled\"

[skills]
include_instructions = false

[skills.bundled]
enabled = false

[agents]
enabled = false

[features]
view_image = false
goals = false
"
        fi
        cat >"$WORK/codex-cfg/config.toml" <<EOF
model = "$model"
model_provider = "mtplx"
$slim_toml

[model_providers.mtplx]
name = "mtplx"
base_url = "$base/v1"
wire_api = "responses"
env_key = "MTPLX_AGENTS_CODEX_KEY"
EOF
        rc_codex=0
        (cd "$WORK/codex-work" && run_client codex env \
            HOME="$WORK/codex-home" CODEX_HOME="$WORK/codex-cfg" \
            MTPLX_AGENTS_CODEX_KEY="${MTPLX_API_KEY:-dummy}" RUST_LOG="${RUST_LOG:-error}" \
            "$CODEX" exec --skip-git-repo-check -m "$model" "$PROMPT") || rc_codex=$?
    fi

    stop_server
    trap - EXIT
    echo "----- server log (last 60 lines): $WORK/server.log"
    tail -n 60 "$WORK/server.log"
    echo "----- summary: claude=$rc_claude codex=$rc_codex (scratch: $WORK)"
    [[ "$rc_claude" =~ ^(0|skipped)$ && "$rc_codex" =~ ^(0|skipped)$ ]]
}

# --------------------------------------------------------------------------- main
if [[ "${1:-}" == "__inner" ]]; then
    inner
    exit $?
fi

install_clients
"$PY" -c 'import mtplx' 2>/dev/null || { log "$PY cannot import mtplx (set MTPLX_PYTHON)"; exit 2; }

if [[ "${MTPLX_AGENTS_NO_NETNS:-0}" == 1 ]]; then
    log "WARNING: MTPLX_AGENTS_NO_NETNS=1, clients are not network-isolated"
    exec bash "$SCRIPT_PATH" __inner
elif unshare -n true 2>/dev/null; then
    exec unshare -n bash "$SCRIPT_PATH" __inner
elif unshare -rn true 2>/dev/null; then  # unprivileged: user + network namespace
    exec unshare -rn bash "$SCRIPT_PATH" __inner
else
    log "cannot create a network namespace (need root or user namespaces);"
    log "set MTPLX_AGENTS_NO_NETNS=1 to run without isolation"
    exit 2
fi
