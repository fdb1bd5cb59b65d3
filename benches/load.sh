#!/usr/bin/env bash
# End-to-end load benchmark: erpgate with the full default policy against nginx, HAProxy and
# Caddy, through ../shared/bench/peers.sh (wrk, 64 keep-alive connections; RSS idle and with
# thousands of idle keep-alive connections). Then the idle-memory bench (idle WebSockets).
#
#   benches/load.sh            full run (about 6 minutes on 2 cores)
#   benches/load.sh --quick    one short round
# Other options go to peers.sh (see its --help). Results: target/peers-bench/<time>/ and the
# tables on stdout.
#
# erpgate runs the default config (config/erpgate.toml: four classes, the admin allowlist,
# rate limits per client IP / integration client at rates the benchmark does not reach,
# in-flight cap, forwarded headers, request ids, security headers) with the listen and pool
# addresses peers.sh expects (127.0.0.1:18080 -> 18069 web, 18072 gevent), health checks
# on, the access log on (to a file: its stdout) or off ([log] level = "warn").
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

# The web pool's health checks ask /web/health; peers.sh's nginx upstream answers every path.
"$PEERS_SH" \
  --candidate "$BIN run --config $PWD/$OUT/erpgate-log-off.toml" \
  --candidate-log "$BIN run --config $PWD/$OUT/erpgate-log-on.toml" \
  --candidate-name erpgate "$@"

IDLE_N=${IDLE_N:-6000} cargo bench --bench idle_memory
