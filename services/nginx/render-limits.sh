#!/bin/sh
# Writes nginx's per-address limits from the environment, before nginx starts: nginx.conf includes the files this
# makes under /tmp (the root file system is read-only). Each value is checked, so a typo stops the container with
# a message instead of loading a configuration that limits nothing.
#   WS_PER_ADDRESS            open chat sockets per client address (limit_conn)
#   WS_CONNECTS_PER_SECOND    new chat sockets per second per address, after a burst of WS_CONNECTS_BURST
#   HTTP_REQUESTS_PER_SECOND  other requests (page, API, health) per second per address, bursts of HTTP_REQUESTS_BURST
#   REAL_IP_FROM              addresses or CIDRs of a trusted proxy in front of nginx: from those, the client is the
#                             last address in X-Forwarded-For. Empty (the default): nginx is the edge, and trusts no one.
set -eu
out=${LIMITS_DIR:-/tmp/nginx-limits}
WS_PER_ADDRESS=${WS_PER_ADDRESS:-64}
WS_CONNECTS_PER_SECOND=${WS_CONNECTS_PER_SECOND:-5}
WS_CONNECTS_BURST=${WS_CONNECTS_BURST:-30}
HTTP_REQUESTS_PER_SECOND=${HTTP_REQUESTS_PER_SECOND:-20}
HTTP_REQUESTS_BURST=${HTTP_REQUESTS_BURST:-100}
REAL_IP_FROM=${REAL_IP_FROM:-}

for pair in "WS_PER_ADDRESS=$WS_PER_ADDRESS" "WS_CONNECTS_PER_SECOND=$WS_CONNECTS_PER_SECOND" \
  "WS_CONNECTS_BURST=$WS_CONNECTS_BURST" "HTTP_REQUESTS_PER_SECOND=$HTTP_REQUESTS_PER_SECOND" \
  "HTTP_REQUESTS_BURST=$HTTP_REQUESTS_BURST"; do
  case "${pair#*=}" in
    '' | *[!0-9]* | 0) echo "render-limits: ${pair%%=*} must be a whole number above 0, not '${pair#*=}'" >&2; exit 1 ;;
  esac
done
# nginx refuses a connection limit of 65536 or more.
if [ "${#WS_PER_ADDRESS}" -gt 5 ] || [ "$WS_PER_ADDRESS" -gt 65535 ]; then
  echo "render-limits: WS_PER_ADDRESS must be at most 65535, not $WS_PER_ADDRESS" >&2
  exit 1
fi

mkdir -p "$out"
{
  echo "limit_conn_zone \$binary_remote_addr zone=sockets_per_address:10m;"
  echo "limit_req_zone \$binary_remote_addr zone=connects_per_address:10m rate=${WS_CONNECTS_PER_SECOND}r/s;"
  echo "limit_req_zone \$binary_remote_addr zone=requests_per_address:10m rate=${HTTP_REQUESTS_PER_SECOND}r/s;"
  for source in $REAL_IP_FROM; do
    case "$source" in
      *[!0-9a-fA-F.:/]*) echo "render-limits: REAL_IP_FROM holds '$source', not an address or CIDR" >&2; exit 1 ;;
    esac
    echo "set_real_ip_from $source;"
  done
  if [ -n "$REAL_IP_FROM" ]; then echo "real_ip_header X-Forwarded-For;"; fi
} >"$out/http.conf"
{
  echo "limit_conn sockets_per_address $WS_PER_ADDRESS;"
  echo "limit_req zone=connects_per_address burst=$WS_CONNECTS_BURST nodelay;"
} >"$out/sockets.conf"
echo "limit_req zone=requests_per_address burst=$HTTP_REQUESTS_BURST nodelay;" >"$out/requests.conf"
