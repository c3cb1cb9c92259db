#!/bin/sh
# Starts Redis with the password from $REDIS_PASSWORD (or the file $REDIS_PASSWORD_FILE names), handed over on
# stdin so that it appears in no file, no process argument and no log. Refuses to start without one.
# REDIS_CLUSTER=true starts it as a Redis Cluster node instead (the `cluster` profile, docs/operations.md);
# REDIS_HA=true as a data node of a primary and its replica watched by Sentinels (the `ha` profile).
set -eu
# shellcheck source=common.sh
. /usr/local/lib/infinite-chat-redis.sh
read_password
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
# INFO does not show it and CONFIG GET is not available: say it in the log.
echo "redis: appendfsync $appendfsync" >&2

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

# The primary as the Sentinels name it ($REDIS_HA_SENTINELS, "host:port ..."): asked until one answers, for at most
# $REDIS_HA_SENTINEL_WAIT seconds; when several answer, the name most of them give. Prints nothing when none did.
sentinels_primary() {
  deadline=$(($(date +%s) + ${REDIS_HA_SENTINEL_WAIT:-5}))
  while :; do
    named=$(for sentinel in $REDIS_HA_SENTINELS; do
        resolves "${sentinel%:*}" || continue
        cli -h "${sentinel%:*}" -p "${sentinel##*:}" sentinel get-master-addr-by-name "$ha_master_name" | head -n 1
      done | grep -E '^[A-Za-z0-9.-]+$' | sort | uniq -c | sort -rn | awk 'NR == 1 { print $2 }')
    if [ -n "$named" ] || [ "$(date +%s)" -ge "$deadline" ]; then break; fi
    sleep 0.5
  done
  echo "$named"
}

# Which node to replicate from, or nothing to be the primary. Neither role is fixed: a node restarted after a
# failover must come back as the replica of the node that took over, never as a second primary. So: what the
# Sentinels say; if none answers (the first start, or all of them down), a peer in $REDIS_HA_NODES that already
# runs as a primary; failing that too (every node starting at once), the roles of the first start:
# $REDIS_HA_INITIAL_PRIMARY is the primary, the others its replicas.
ha_upstream() {
  primary=$(sentinels_primary)
  if [ -n "$primary" ]; then
    echo "redis: the Sentinels name $primary as the primary" >&2
  else
    for peer in $REDIS_HA_NODES; do
      if [ "$peer" = "$me" ] || ! resolves "$peer"; then continue; fi
      if [ "$(cli -h "$peer" role | head -n 1)" = master ]; then primary=$peer; break; fi
    done
    if [ -n "$primary" ]; then
      echo "redis: no Sentinel answers; $primary runs as the primary" >&2
    else
      primary=$REDIS_HA_INITIAL_PRIMARY
      echo "redis: no Sentinel answers and no node runs as a primary; $primary is the primary, as at the first start" >&2
    fi
  fi
  # A Sentinel that names an address instead of a host name: compare it with this node's.
  if [ "$primary" = "$me" ] || [ "$primary" = "$(getent ahostsv4 "$me" | awk 'NR == 1 { print $1 }')" ]; then
    echo ""
  else
    echo "$primary"
  fi
}

# CONFIG stays unusable: gone on a single Redis and a cluster node, renamed after the password in HA mode (common.sh).
config_name=""
ha=""
case "${REDIS_HA:-false}" in
  false) ;;
  true)
    [ -z "$cluster" ] || { echo "redis: REDIS_HA and REDIS_CLUSTER exclude each other" >&2; exit 1; }
    : "${REDIS_HA_SENTINELS:?REDIS_HA_SENTINELS must name the Sentinels, as host:port separated by spaces}"
    : "${REDIS_HA_NODES:?REDIS_HA_NODES must name the data nodes (host names separated by spaces)}"
    : "${REDIS_HA_INITIAL_PRIMARY:?REDIS_HA_INITIAL_PRIMARY must name the node that is the primary at the first start}"
    case "${REDIS_HA_SENTINEL_WAIT:-5}" in
      *[!0-9]* | "") echo "redis: REDIS_HA_SENTINEL_WAIT must be seconds, such as 5" >&2; exit 1 ;;
    esac
    # The name the Sentinels and the other node reach this one by (Compose: the service name, its hostname).
    # Announced instead of an address, which changes when a container is recreated.
    me=${REDIS_HA_ANNOUNCE_HOSTNAME:-$(uname -n)}
    case "$me" in
      *[!A-Za-z0-9.-]* | "") echo "redis: REDIS_HA_ANNOUNCE_HOSTNAME must be a host name" >&2; exit 1 ;;
    esac
    upstream=$(ha_upstream)
    if [ -n "$upstream" ]; then
      echo "redis: starting as a replica of $upstream" >&2
      role="replicaof $upstream 6379"
    else
      echo "redis: starting as the primary" >&2
      role=""
    fi
    config_name=$(config_command_name)
    # masterauth on the primary too: Sentinel may make it a replica later.
    ha="replica-announce-ip $me
masterauth \"$password\"
$role"
    ;;
  *) echo "redis: REDIS_HA must be true or false" >&2; exit 1 ;;
esac

# exec: Redis becomes PID 1 and gets docker stop's SIGTERM itself, so it flushes the append-only file.
exec redis-server /etc/redis/infinite-chat.conf - <<CONF
requirepass "$password"
maxmemory $maxmemory
appendfsync $appendfsync
rename-command CONFIG "$config_name"
$cluster
$ha
CONF
