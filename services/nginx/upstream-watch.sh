#!/bin/sh
# Runs nginx, and reloads it whenever the set of addresses behind "web" changes (docker compose --scale, a
# replica recreated with a new address). nginx 1.22 resolves upstream names only when it loads its
# configuration; a reload re-resolves them without dropping open connections (old workers finish theirs).
set -eu
UPSTREAM_HOST=${UPSTREAM_HOST:-web}
INTERVAL=${UPSTREAM_WATCH_INTERVAL:-2}

addresses() {
  getent ahostsv4 "$UPSTREAM_HOST" 2>/dev/null | awk '{print $1}' | sort -u | tr '\n' ' '
}

render-limits
nginx -g 'daemon off;' &
nginx_pid=$!
trap 'kill -QUIT "$nginx_pid" 2>/dev/null; wait "$nginx_pid"; exit 0' TERM INT QUIT

known=$(addresses)
while kill -0 "$nginx_pid" 2>/dev/null; do
  sleep "$INTERVAL" &
  wait $! || true
  current=$(addresses)
  # Nothing resolves while every replica is down: keep the last good set rather than fail the reload.
  if [ -n "$current" ] && [ "$current" != "$known" ]; then
    echo "upstream-watch: $UPSTREAM_HOST is now $current; reloading nginx" >&2
    if nginx -s reload; then known=$current; fi
  fi
done
wait "$nginx_pid"
