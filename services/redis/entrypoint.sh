#!/bin/sh
# Starts Redis with the password from $REDIS_PASSWORD (or the file $REDIS_PASSWORD_FILE names), handed over on
# stdin so that it appears in no file, no process argument and no log. Refuses to start without one.
# REDIS_CLUSTER=true starts it as a Redis Cluster node instead (the `cluster` profile, docs/operations.md).
set -eu
password=""
if [ -n "${REDIS_PASSWORD:-}" ]; then
  password=$REDIS_PASSWORD
elif [ -n "${REDIS_PASSWORD_FILE:-}" ] && [ -r "$REDIS_PASSWORD_FILE" ]; then
  password=$(cat "$REDIS_PASSWORD_FILE")
fi
if [ -z "$password" ]; then
  echo "redis: no password (set REDIS_PASSWORD in .env; scripts/up makes one); refusing to start" >&2
  exit 1
fi
case "$password" in
  *[!A-Za-z0-9_-]*) echo "redis: the password may hold only letters, digits, - and _" >&2; exit 1 ;;
esac
maxmemory=${REDIS_MAXMEMORY:-512mb}
case "$maxmemory" in
  *[!0-9a-zA-Z]* | "") echo "redis: REDIS_MAXMEMORY must be a size such as 512mb" >&2; exit 1 ;;
esac
# always: the append-only file is on disk before a reply (or a published message) leaves; everysec: once a second.
appendfsync=${REDIS_APPENDFSYNC:-always}
case "$appendfsync" in
  always | everysec) ;;
  *) echo "redis: REDIS_APPENDFSYNC must be always or everysec" >&2; exit 1 ;;
esac

# A node that comes back (restarted, recreated, after a reboot) may find its peers, and itself, at other addresses
# than its nodes.conf remembers. Redis heals some of that by gossip, but not all: two nodes that each hold a stale
# address of the other (say they swapped addresses) may never speak again, and a replica that cannot reach a
# majority of the primaries cannot be promoted. So, before Redis reads nodes.conf, every node there gets the
# address its announced host name has now: waiting up to 10 s for peers that are starting at the same time; a peer
# still not resolvable then (it is down) keeps its old address, and, when it comes back, reaches this node itself.
refresh_addresses() {
  conf=/data/nodes.conf
  [ -s "$conf" ] || return 0
  hosts=$(awk '$2 ~ /,/ { sub(/^[^,]*,/, "", $2); print $2 }' "$conf")
  known=/tmp/cluster-addresses
  tries=50
  while :; do
    : >"$known"
    missing=""
    for host in $hosts; do
      ip=$(getent ahostsv4 "$host" | awk 'NR == 1 { print $1 }')
      if [ -n "$ip" ]; then echo "$host $ip" >>"$known"; else missing="$missing $host"; fi
    done
    tries=$((tries - 1))
    [ -z "$missing" ] || [ "$tries" -le 0 ] && break
    sleep 0.2
  done
  [ -z "$missing" ] || echo "redis: not resolvable now, keeping their last addresses:$missing" >&2
  # Field 2 is <ip>:<port>@<bus port>,<host name>; a node Redis had lost the address of is saved as :0@0 and
  # flagged noaddr. Every node of this image listens on 6379, its bus on 16379.
  awk 'NR == FNR { ip[$1] = $2; next }
       $2 ~ /,/ {
         host = $2; sub(/^[^,]*,/, "", host)
         if (host in ip) {
           $2 = ip[host] ":6379@16379," host
           sub(/,noaddr|noaddr,/, "", $3)
         }
       }
       { print }' "$known" "$conf" >"$conf.refreshed"
  mv "$conf.refreshed" "$conf"
}

cluster=""
case "${REDIS_CLUSTER:-false}" in
  false) ;;
  true)
    timeout=${REDIS_CLUSTER_NODE_TIMEOUT:-5000}
    case "$timeout" in
      *[!0-9]* | "") echo "redis: REDIS_CLUSTER_NODE_TIMEOUT must be milliseconds, such as 5000" >&2; exit 1 ;;
    esac
    # The name other containers reach this node by (Compose: the service name, which is also its hostname).
    announce=${REDIS_CLUSTER_ANNOUNCE_HOSTNAME:-$(uname -n)}
    case "$announce" in
      *[!A-Za-z0-9.-]* | "") echo "redis: REDIS_CLUSTER_ANNOUNCE_HOSTNAME must be a host name" >&2; exit 1 ;;
    esac
    # nodes.conf lives on the node's volume: a restarted node finds its identity, its slots and its peers there.
    # Clients are sent host names (MOVED, CLUSTER SHARDS/SLOTS), which Compose's DNS keeps right when a container
    # comes back with another address; the cluster bus itself works with addresses (refresh_addresses above).
    # A replica authenticates to its primary with the same password (masterauth).
    # cluster-require-full-coverage no: while one shard has no primary (between a primary's failure and its
    # replica's promotion), the other shards keep serving their rooms instead of the whole cluster refusing.
    cluster="cluster-enabled yes
cluster-config-file /data/nodes.conf
cluster-node-timeout $timeout
cluster-require-full-coverage no
cluster-announce-hostname $announce
cluster-preferred-endpoint-type hostname
masterauth \"$password\""
    refresh_addresses
    ;;
  *) echo "redis: REDIS_CLUSTER must be true or false" >&2; exit 1 ;;
esac

# exec: Redis becomes PID 1 and gets docker stop's SIGTERM itself, so it flushes the append-only file.
exec redis-server /etc/redis/infinite-chat.conf - <<CONF
requirepass "$password"
maxmemory $maxmemory
appendfsync $appendfsync
$cluster
CONF
