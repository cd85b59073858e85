#!/usr/bin/env bash
# Prometheus for Understudy's dashboards and alerts, from Debian's `prometheus` package.
#
#   scripts/prometheus.sh check
#       installs the package if needed, then `promtool check rules dashboards/alerts.yml`,
#       `promtool test rules dashboards/alerts_test.yml dashboards/alerts_drill_test.yml` and
#       `promtool check config` on the
#       example dashboards/prometheus.yml.
#   scripts/prometheus.sh run LISTEN DATA_DIR INTERVAL TARGET...
#       writes DATA_DIR/prometheus.yml (job `understudy`, every TARGET host:port scraped every
#       INTERVAL, the rules of dashboards/alerts.yml evaluated as often) and runs Prometheus in
#       the foreground on LISTEN (e.g. 127.0.0.1:9090), its database in DATA_DIR.
#       Example: scripts/prometheus.sh run 127.0.0.1:9090 /tmp/prom 5s 127.0.0.1:9100 127.0.0.1:9101
# tests/observability.rs uses both.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/ensure-deps.sh"

cmd="${1:-}"
case "$cmd" in
check)
    ensure_prometheus
    promtool check rules "$root/dashboards/alerts.yml"
    promtool test rules "$root/dashboards/alerts_test.yml" "$root/dashboards/alerts_drill_test.yml"
    promtool check config "$root/dashboards/prometheus.yml"
    ;;
run)
    if [ $# -lt 5 ]; then
        echo "usage: $0 run LISTEN DATA_DIR INTERVAL TARGET..." >&2
        exit 2
    fi
    listen="$2" dir="$3" interval="$4"
    shift 4
    ensure_prometheus
    mkdir -p "$dir"
    targets=""
    for t in "$@"; do targets="$targets\"$t\", "; done
    cat >"$dir/prometheus.yml" <<CONF
global:
  scrape_interval: $interval
  scrape_timeout: $interval
  evaluation_interval: $interval
rule_files:
  - $root/dashboards/alerts.yml
scrape_configs:
  - job_name: understudy
    static_configs:
      - targets: [${targets%, }]
CONF
    promtool check config "$dir/prometheus.yml" >&2
    exec prometheus --config.file="$dir/prometheus.yml" --web.listen-address="$listen" \
        --storage.tsdb.path="$dir/data" --log.level=warn
    ;;
*)
    echo "usage: $0 check | run LISTEN DATA_DIR INTERVAL TARGET..." >&2
    exit 2
    ;;
esac
