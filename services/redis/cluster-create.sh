#!/bin/sh
# One-shot: makes the Redis Cluster of the nodes in $REDIS_CLUSTER_NODES ("host:port host:port ...") and exits 0
# once it serves all 16384 slots, each primary with $REDIS_CLUSTER_REPLICAS replicas (1). Run again, it creates
# nothing: a cluster that exists is only waited for. Everything is bounded by $REDIS_CLUSTER_CREATE_TIMEOUT seconds
# (120); on failure it says what it saw and exits 1. The password comes as in entrypoint.sh, into REDISCLI_AUTH
# (never on a command line).
set -eu

log() { echo "redis-cluster-create: $*"; }
die() { echo "redis-cluster-create: $*" >&2; exit 1; }

password=${REDIS_PASSWORD:-}
if [ -z "$password" ] && [ -n "${REDIS_PASSWORD_FILE:-}" ] && [ -r "$REDIS_PASSWORD_FILE" ]; then
  password=$(cat "$REDIS_PASSWORD_FILE")
fi
[ -n "$password" ] || die "no password (REDIS_PASSWORD or REDIS_PASSWORD_FILE)"
export REDISCLI_AUTH="$password"

nodes=${REDIS_CLUSTER_NODES:?set REDIS_CLUSTER_NODES to the nodes, as host:port separated by spaces}
per_primary=${REDIS_CLUSTER_REPLICAS:-1}
timeout=${REDIS_CLUSTER_CREATE_TIMEOUT:-120}
case "$per_primary$timeout" in *[!0-9]*) die "REDIS_CLUSTER_REPLICAS and REDIS_CLUSTER_CREATE_TIMEOUT are numbers" ;; esac
count=$(echo "$nodes" | wc -w)
primaries=$((count / (per_primary + 1)))
[ "$primaries" -ge 3 ] && [ $((primaries * (per_primary + 1))) -eq "$count" ] \
  || die "$count nodes do not make at least 3 primaries with $per_primary replicas each"
deadline=$(($(date +%s) + timeout))

left() { echo $((deadline - $(date +%s))); }
cli() { host=${1%:*} port=${1##*:}; shift; redis-cli -h "$host" -p "$port" "$@" 2>&1 | tr -d '\r'; }
field() { cli "$1" cluster info | sed -n "s/^$2://p"; }

# The shape of the cluster as one node sees it, from CLUSTER NODES: "ok", or what is wrong.
shape() {
  cli "$1" cluster nodes | awk -v nodes="$count" -v primaries="$primaries" -v per_primary="$per_primary" '
    $3 ~ /fail|handshake|noaddr/ { bad = bad " " $2 "(" $3 ")" }
    $3 ~ /master/ && NF >= 9 {
      serving++
      for (i = 9; i <= NF; i++) {
        if ($i ~ /^\[/) continue  # a slot being migrated: counted where it is served
        n = split($i, range, "-")
        slots += (n == 2) ? range[2] - range[1] + 1 : 1
      }
    }
    $3 ~ /slave/ { following[$4]++ }
    $3 ~ /master/ { id[$1] = 1 }
    END {
      for (p in following) if (!(p in id)) orphans++
      for (p in id) if (following[p] + 0 != per_primary) uneven = uneven " " p "=" following[p] + 0
      if (NR != nodes) print "knows " NR " nodes, not " nodes
      else if (bad != "") print "nodes failing:" bad
      else if (serving != primaries) print serving + 0 " primaries serve slots, not " primaries
      else if (slots != 16384) print slots + 0 " of 16384 slots covered"
      else if (orphans || uneven != "") print "replicas per primary:" uneven
      else print "ok"
    }'
}

# 1. Every node answers (its name resolves and it says PONG).
addresses=""
for node in $nodes; do
  host=${node%:*} port=${node##*:}
  while :; do
    ip=$(getent ahostsv4 "$host" | awk 'NR == 1 { print $1 }')
    if [ -n "$ip" ] && [ "$(cli "$node" ping)" = PONG ]; then break; fi
    [ "$(left)" -gt 0 ] || die "$node did not answer within ${timeout} s: $(cli "$node" ping)"
    sleep 1
  done
  # redis-cli --cluster create (7.0) sends CLUSTER MEET, which takes addresses, not names.
  addresses="$addresses $ip:$port"
done

# 2. Create the cluster, unless one exists: a node that knows other nodes or serves slots has been in one.
fresh=yes
for node in $nodes; do
  if [ "$(field "$node" cluster_known_nodes)" != 1 ] || [ "$(field "$node" cluster_slots_assigned)" != 0 ]; then
    fresh=no
  fi
done
if [ "$fresh" = yes ]; then
  log "creating the cluster of $count nodes ($primaries primaries, $per_primary replica(s) each):$addresses"
  # shellcheck disable=SC2086 # one argument per node
  timeout "$(($(left) > 0 ? $(left) : 1))" redis-cli --cluster create $addresses --cluster-replicas "$per_primary" --cluster-yes \
    || die "redis-cli --cluster create failed (above)"
else
  log "a cluster exists already; waiting until it is whole"
fi

# 3. Wait until every node says cluster_state:ok and the first sees the whole shape.
first=${nodes%% *}
while :; do
  states="" all_ok=yes
  for node in $nodes; do
    state=$(field "$node" cluster_state)
    states="$states $node=$state"
    [ "$state" = ok ] || all_ok=no
  done
  seen=$(shape "$first")
  [ "$all_ok" = yes ] && [ "$seen" = ok ] && break
  [ "$(left)" -gt 0 ] || die "the cluster is not whole after ${timeout} s: cluster_state$states; $first: $seen"
  sleep 1
done
log "the cluster is ok: $primaries primaries with $per_primary replica(s) each, all 16384 slots served"
