#!/usr/bin/env bash
# Instructions erpgate executes per request, counted by callgrind: a figure that varies by
# well under 1 % between runs of one build, where req/s and CPU time on this shared machine
# vary by 10-25 % between minutes. For comparing builds (a change of a few percent), not for
# absolute speed: it counts user-space instructions only, not system calls, cache misses or
# contention between threads.
#
#   benches/instructions.sh [--log] [BINARY]    default: target/release/erpgate (built)
#
# erpgate runs the default config (log off, as benches/load.sh's "off" variant; with --log,
# the access log on, to a file, as its "on" variant) under
# `valgrind --tool=callgrind` in front of a one-worker nginx upstream; wrk -t1 -c16 warms it
# up for 5 s, then instrumentation is on for 10 s of wrk (a bare GET, then the same with the
# 12 more fields of a browser's request). Prints instructions per request for each. Needs
# valgrind, nginx and wrk; ports 18269 (upstream), 18280 (erpgate) and 18913 (admin).
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in valgrind callgrind_control callgrind_annotate nginx wrk curl; do
  command -v "$tool" >/dev/null || { echo "instructions.sh: needs $tool" >&2; exit 2; }
done
level=warn
if [[ ${1:-} == --log ]]; then
  level=info
  shift
fi
if [[ $# -gt 0 ]]; then
  BIN=$(realpath "$1")
else
  cargo build --release --bin erpgate
  BIN="$PWD/target/release/erpgate"
fi
d=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$d"
}
trap cleanup EXIT

page=$(printf 'padding %.0s' $(seq 75))
cat >"$d/up.conf" <<CONF
worker_processes 1; daemon off; pid $d/up.pid; error_log $d/up.err;
events { worker_connections 4096; }
http { access_log off;
  client_body_temp_path $d; proxy_temp_path $d; fastcgi_temp_path $d; uwsgi_temp_path $d; scgi_temp_path $d;
  server { listen 127.0.0.1:18269; location / { return 200 "<html>$page</html>"; } } }
CONF
sed -e 's|"0.0.0.0:8080"|"127.0.0.1:18280"|' \
    -e 's|"127.0.0.1:9901"|"127.0.0.1:18913"|' \
    -e 's|127.0.0.1:8069|127.0.0.1:18269|' \
    -e 's|127.0.0.1:8072|127.0.0.1:18269|' \
    -e "s|erpgate-audit.jsonl|$d/audit.jsonl|" \
    -e "s|^level = \"info\"|level = \"$level\"|" \
    -e 's|rate = "100/s", burst = 200|rate = "1000000/s", burst = 1000000|' \
    config/erpgate.toml >"$d/erpgate.toml"
# The fields a browser adds to a page load's GET (wrk sends Host only).
browser=()
while IFS= read -r field; do browser+=(-H "$field"); done <<'FIELDS'
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36
Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8
Accept-Language: en-US,en;q=0.9,fr;q=0.8
Accept-Encoding: gzip, deflate, br
Cookie: session_id=0123456789abcdef0123456789abcdef01234567; frontend_lang=en_US; tz=Europe/Brussels
Referer: http://127.0.0.1/odoo/action-account.action_move_out_invoice_type
Sec-Fetch-Dest: document
Sec-Fetch-Mode: navigate
Sec-Fetch-Site: same-origin
Upgrade-Insecure-Requests: 1
Cache-Control: max-age=0
Sec-Ch-Ua-Platform: "Linux"
FIELDS

nginx -p "$d" -c "$d/up.conf" >/dev/null 2>&1 &
pids+=($!)
URL=http://127.0.0.1:18280/web/login

count() { # count NAME [wrk args...]: instructions per request of one measured wrk run
  local name=$1 v out n ir f i
  shift
  rm -f "$d"/cg.*
  # erpgate sets these itself by starting again, which valgrind would not follow.
  MIMALLOC_ARENA_EAGER_COMMIT=0 MIMALLOC_PURGE_DELAY=10 \
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$d/cg.%p" \
    "$BIN" run --config "$d/erpgate.toml" >"$d/erpgate.log" 2>&1 &
  v=$!
  pids+=("$v")
  for ((i = 0; i < 600; i++)); do
    curl -s -o /dev/null "$URL" && break
    kill -0 "$v" 2>/dev/null || { cat "$d/erpgate.log" >&2; exit 1; }
    sleep 0.2
  done
  wrk -t1 -c16 -d5s "$@" "$URL" >/dev/null
  callgrind_control -i on "$v" >/dev/null 2>&1
  out=$(wrk -t1 -c16 -d10s "$@" "$URL")
  callgrind_control -i off "$v" >/dev/null 2>&1
  callgrind_control -d "$v" >/dev/null 2>&1
  kill -INT "$v"
  wait "$v" 2>/dev/null || true
  n=$(awk '/requests in/ {print $1}' <<<"$out")
  ir=0
  for f in "$d"/cg.*; do
    ir=$((ir + $(callgrind_annotate "$f" 2>/dev/null |
      awk '/PROGRAM TOTALS/ && !n {gsub(",", "", $1); n = $1 + 0} END {print n + 0}')))
  done
  if [[ $(awk '/Non-2xx|Socket errors/' <<<"$out") ]]; then
    echo "instructions.sh: errors in the measured run:" >&2
    echo "$out" >&2
    exit 1
  fi
  if [[ $level == info ]] && (($(grep -c ' erpgate::access: ' "$d/erpgate.log") < n)); then
    echo "instructions.sh: fewer access lines than the $n requests measured" >&2
    exit 1
  fi
  printf '%-38s %8d requests  %6d instructions a request\n' "$name" "$n" $((ir / n))
}
log=""
[[ $level == info ]] && log=", log on"
count "GET, one field (wrk's)$log"
count "GET, 13 fields (a browser's)$log" "${browser[@]}"
