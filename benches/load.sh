#!/usr/bin/env bash
# End-to-end load benchmark: erpgate with the full default policy against nginx, HAProxy and
# Caddy, through ../shared/bench/peers.sh (wrk, 64 keep-alive connections; RSS idle and with
# thousands of idle keep-alive connections). Then the idle-memory bench (idle WebSockets).
#
#   benches/load.sh            full run (about 19 minutes on 2 cores, with its two builds)
#   benches/load.sh --quick    one short round
# Other options go to peers.sh (see its --help). Results: target/peers-bench/<time>/ and the
# tables on stdout. Then the case of an upstream that closes every connection (as Odoo's
# HTTP workers do), nginx against erpgate; nginx, HAProxy and erpgate with their threads
# pinned to CPUs; the three again with the access log on, as peers.sh's log-on pass, on ports
# of their own; and the idle-memory bench.
#
# erpgate runs the default config (config/erpgate.toml: four classes, the admin allowlist,
# rate limits per client IP / integration client at rates the benchmark does not reach,
# in-flight cap, forwarded headers, request ids, security headers) with the listen and pool
# addresses peers.sh expects (127.0.0.1:18080 -> 18069 web, 18072 gevent), health checks
# on, the access log on (its stdout, to target/load-bench/erpgate-access.log, removed after
# peers.sh) or off ([log] level = "warn").
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS_SH=${PEERS_SH:-../shared/bench/peers.sh}
OUT=target/load-bench
mkdir -p "$OUT"

cargo build --release --bin erpgate
BIN="$PWD/target/release/erpgate"

config() { # log level
  sed -e 's|"0.0.0.0:8080"|"127.0.0.1:18080"|' \
      -e 's|"127.0.0.1:9901"|"127.0.0.1:18901"|' \
      -e 's|127.0.0.1:8069|127.0.0.1:18069|' \
      -e 's|127.0.0.1:8072|127.0.0.1:18072|' \
      -e "s|erpgate-audit.jsonl|$PWD/$OUT/audit.jsonl|" \
      -e "s|^level = \"info\"|level = \"$1\"|" \
      -e 's|rate = "100/s", burst = 200|rate = "1000000/s", burst = 1000000|' \
      config/erpgate.toml
}
config info >"$OUT/erpgate-log-on.toml"
config warn >"$OUT/erpgate-log-off.toml"
"$BIN" check --config "$OUT/erpgate-log-on.toml"
"$BIN" check --config "$OUT/erpgate-log-off.toml"

# peers.sh can lose track of an erpgate it started: it looks for the new process's session
# before the child has called setsid, notes "erpgate (on) did not come up", signals nothing
# and then waits for that erpgate for good. This watchdog stops such an erpgate (SIGINT, by
# PID) once the note is written, so the run goes on without that round instead of hanging.
# It signals again each second until the process is gone: a SIGINT that comes before
# erpgate has set its handler is lost (a background job of a script starts with SIGINT
# ignored), which stalled the 12:54 UTC run for four minutes.
stop_lost_candidates() {
  local marker=$1 seen=0 n f pid i
  while sleep 0.5; do
    n=0
    while IFS= read -r f; do
      n=$((n + $(grep -c '^erpgate (o[nf]*) did not come up' "$f" || true)))
    done < <(find "${BENCH_OUT:-$PWD/target/peers-bench}" -name notes.txt -newer "$marker" 2>/dev/null)
    ((n > seen)) || continue
    seen=$n
    for pid in $(pgrep -f "^$BIN run --config $PWD/$OUT/erpgate-log-o(n|ff)\.toml\$" || true); do
      echo "load.sh: stopping erpgate $pid, which peers.sh reported as not up and waits for" >&2
      for ((i = 0; i < 30; i++)); do
        kill -INT "$pid" 2>/dev/null || break
        sleep 1
      done
    done
  done
}
touch "$OUT/peers.start"
stop_lost_candidates "$OUT/peers.start" &
watchdog=$!
trap 'kill "$watchdog" 2>/dev/null || true' EXIT
# Why peers.sh lost a round: it starts a candidate with its output to a file (`>"$outf"`),
# and the child truncates that file before it calls setsid. With erpgate's access log in
# it (about 200 MB after a 10 s round), truncating took 90-140 ms here, long enough for
# peers.sh's first look for the new session (`ps`, right after the start) to find none: the
# middle round of the log-on pass, in every run (the first round has no file to truncate
# yet, the third only what the lost round wrote). So erpgate's access log goes to a file of
# its own, opened (and truncated) by the `bash -c` that peers.sh runs, in the new session;
# `exec` keeps erpgate the process peers.sh started. The watchdog stays for any other cause.
ACCESS="$PWD/$OUT/erpgate-access.log"
# The web pool's health checks ask /web/health; peers.sh's nginx upstream answers every path.
"$PEERS_SH" \
  --candidate "$BIN run --config $PWD/$OUT/erpgate-log-off.toml" \
  --candidate-log "exec $BIN run --config $PWD/$OUT/erpgate-log-on.toml >$ACCESS" \
  --candidate-name erpgate "$@"
kill "$watchdog" 2>/dev/null || true
rm -f "$ACCESS"

# rounds SECONDS WARMUP NAME:PORT...: wrk -t1 -c64 against each in turn, 3 rounds, a line each.
rounds() {
  local secs=$1 warm=$2 r t
  shift 2
  for r in 1 2 3; do
    for t in "$@"; do
      ((warm > 0)) && wrk -t1 -c64 -d"${warm}s" "http://127.0.0.1:${t##*:}/web/login" >/dev/null 2>&1
      printf '%-8s round %s: ' "${t%%:*}" "$r"
      wrk -t1 -c64 -d"${secs}s" --latency "http://127.0.0.1:${t##*:}/web/login" 2>&1 \
        | awk '/Requests\/sec/ {rps=$2} / 99%/ {p99=$2} END {print rps " req/s, p99 " p99}'
    done
  done
}

# Odoo's HTTP workers close every connection (HTTP/1.0 + Connection: close), so every request
# also opens an upstream connection: nginx and erpgate in front of an upstream that does not
# keep connections alive, wrk -t1 -c64, alternating rounds.
close_upstream_case() {
  command -v nginx >/dev/null && command -v wrk >/dev/null || { echo "no nginx/wrk" >&2; return 0; }
  local d pids=()
  d=$(mktemp -d)
  local page; page=$(printf 'padding %.0s' $(seq 75))
  cat >"$d/up.conf" <<CONF
worker_processes 1; daemon off; pid $d/up.pid; error_log $d/up.err;
events { worker_connections 4096; }
http { access_log off; keepalive_timeout 0;
  client_body_temp_path $d; proxy_temp_path $d; fastcgi_temp_path $d; uwsgi_temp_path $d; scgi_temp_path $d;
  server { listen 127.0.0.1:18169; location / { return 200 "<html>$page</html>"; } } }
CONF
  cat >"$d/proxy.conf" <<CONF
worker_processes 2; daemon off; pid $d/proxy.pid; error_log $d/proxy.err;
events { worker_connections 4096; }
http { access_log off;
  client_body_temp_path $d; proxy_temp_path $d; fastcgi_temp_path $d; uwsgi_temp_path $d; scgi_temp_path $d;
  server { listen 127.0.0.1:18181; location / { proxy_pass http://127.0.0.1:18169; } } }
CONF
  sed -e 's|127.0.0.1:18080|127.0.0.1:18180|' -e 's|127.0.0.1:18901|127.0.0.1:18902|' \
      -e 's|127.0.0.1:18069|127.0.0.1:18169|' "$OUT/erpgate-log-off.toml" >"$d/erpgate.toml"
  nginx -p "$d" -c "$d/up.conf" >/dev/null 2>&1 & pids+=($!)
  nginx -p "$d" -c "$d/proxy.conf" >/dev/null 2>&1 & pids+=($!)
  "$BIN" run --config "$d/erpgate.toml" >/dev/null 2>&1 & pids+=($!)
  for _ in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:18180/web/login && break; sleep 0.1; done
  echo "upstream without keep-alive (wrk -t1 -c64 -d8s):"
  rounds 8 0 nginx:18181 erpgate:18180
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$d"
}
close_upstream_case

# side_case pinned|free on|off: nginx, HAProxy and erpgate from peers.sh's own configs (the
# access-log variant with "on", to files), in front of peers.sh's upstream, wrk -t1 -c64 10 s
# after 1 s, 3 alternating rounds; with "pinned", each with its threads on CPUs of their own
# (nginx `worker_cpu_affinity auto`, HAProxy `cpu-map`, erpgate `pin_threads`). peers.sh runs
# every proxy with its threads free to move between CPUs; "free on" gives its log-on pass
# again, on ports of its own (its log-on pass lost one of erpgate's rounds in every run until
# erpgate's log got a file of its own, above).
side_case() {
  local mode=$1 log=$2 peers base drop
  peers="$(dirname "$PEERS_SH")/peers"
  command -v nginx >/dev/null && command -v haproxy >/dev/null && command -v wrk >/dev/null \
    && [[ -f $peers/nginx.conf ]] || { echo "$mode/$log case: needs nginx, haproxy, wrk and $peers" >&2; return 0; }
  # Ports of its own: 18380-18382 (upstream 18369/18372) pinned, 18480-18482 (18469/18472) free.
  base=183; [[ $mode == free ]] && base=184
  drop='#@log-on'; [[ $log == on ]] && drop='#@log-off'
  local d pids=() pin_nginx='' pin_haproxy='' pin_erpgate=''
  if [[ $mode == pinned ]]; then
    pin_nginx='s|^worker_processes 2;.*|worker_processes 2;\nworker_cpu_affinity auto;|'
    pin_haproxy='s|^\( *\)nbthread 2.*|\1nbthread 2\n\1cpu-map auto:1/1-2 0-1|'
    pin_erpgate='s|^\[server\]$|[server]\npin_threads = true|'
  fi
  d=$(mktemp -d)
  mkdir -p "$d/tmp"
  local ports=(-e "s|127.0.0.1:18069|127.0.0.1:${base}69|" -e "s|127.0.0.1:18072|127.0.0.1:${base}72|")
  sed -e '/#@log-on/d' -e "s|@RUN@|$d|g" "${ports[@]}" "$peers/upstream.conf" >"$d/up.conf"
  sed -e "/$drop/d" -e "s|@RUN@|$d|g" "${ports[@]}" -e "s|127.0.0.1:18080|127.0.0.1:${base}81|" \
      -e "${pin_nginx:-s|^||}" "$peers/nginx.conf" >"$d/nginx.conf"
  sed -e "/$drop/d" "${ports[@]}" -e "s|127.0.0.1:18080|127.0.0.1:${base}82|" \
      -e "${pin_haproxy:-s|^||}" "$peers/haproxy.cfg" >"$d/haproxy.cfg"
  sed -e "s|127.0.0.1:18080|127.0.0.1:${base}80|" -e "s|127.0.0.1:18901|127.0.0.1:${base}03|" \
      "${ports[@]}" -e "${pin_erpgate:-s|^||}" "$OUT/erpgate-log-$log.toml" >"$d/erpgate.toml"
  if [[ $mode == pinned ]]; then
    grep -q '^worker_cpu_affinity' "$d/nginx.conf" && grep -q 'cpu-map' "$d/haproxy.cfg" \
      && grep -q '^pin_threads = true' "$d/erpgate.toml" || { echo "pinned case: configs not as expected" >&2; rm -rf "$d"; return 0; }
  fi
  if [[ $log == on ]]; then
    grep -q '^ *access_log .*combined' "$d/nginx.conf" && grep -q 'option httplog' "$d/haproxy.cfg" \
      && grep -q '^level = "info"' "$d/erpgate.toml" || { echo "log-on case: configs not as expected" >&2; rm -rf "$d"; return 0; }
  fi
  nginx -p "$d" -c "$d/up.conf" >/dev/null 2>&1 & pids+=($!)
  nginx -p "$d" -c "$d/nginx.conf" >/dev/null 2>&1 & pids+=($!)
  haproxy -db -f "$d/haproxy.cfg" >"$d/haproxy-access.log" 2>&1 & pids+=($!)
  "$BIN" run --config "$d/erpgate.toml" >"$d/erpgate-access.log" 2>&1 & pids+=($!)
  for t in ${base}81 ${base}82 ${base}80; do
    for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$t/web/login" && break; sleep 0.1; done
  done
  if [[ $mode == pinned ]]; then
    echo "each proxy's threads pinned to CPUs, access log $log (wrk -t1 -c64 -d10s):"
  else
    echo "threads free, access log $log, as peers.sh's pass (wrk -t1 -c64 -d10s):"
  fi
  rounds 10 1 nginx:${base}81 haproxy:${base}82 erpgate:${base}80
  if [[ $log == on ]]; then
    printf 'access lines written: nginx %s, haproxy %s, erpgate %s\n' "$(wc -l <"$d/nginx-access.log")" \
      "$(wc -l <"$d/haproxy-access.log")" "$(grep -c 'erpgate::access' "$d/erpgate-access.log")"
  fi
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$d"
}
side_case pinned off
side_case free on

ulimit -n "$(ulimit -Hn)" 2>/dev/null || true   # the bench holds 10,000 sockets at once
cargo bench --bench idle_memory
