#!/bin/sh
# Starts a Redis Sentinel (profile `ha`, docs/operations.md "HA profile"): one of the three that watch the primary
# and its replica, named $ha_master_name (common.sh), and promote the replica when the primary fails.
# The password (REDIS_PASSWORD or REDIS_PASSWORD_FILE, as for the data nodes) reaches Sentinel on stdin; it is
# Sentinel's own (requirepass, and sentinel-pass between Sentinels) and the data nodes' (auth-pass).
#
# Sentinel keeps its state in its config file, which it rewrites (the current primary, the replicas and Sentinels it
# knows, its id, the epochs), so that file is on a volume of its own: a Sentinel started again still knows which node
# is the primary after a failover. At every start this script writes the file anew from what it set and the state
# Sentinel had saved there; the password is not among what it writes, but Sentinel's own rewrites put it back (on the
# volume, mode 600, readable only by the redis user).
set -eu
# shellcheck source=common.sh
. /usr/local/lib/infinite-chat-redis.sh
read_password

: "${REDIS_HA_NODES:?REDIS_HA_NODES must name the data nodes (host names separated by spaces)}"
: "${REDIS_HA_INITIAL_PRIMARY:?REDIS_HA_INITIAL_PRIMARY must name the node that is the primary at the first start}"
quorum=${REDIS_SENTINEL_QUORUM:-2}
down_after=${REDIS_SENTINEL_DOWN_AFTER_MS:-3000}
# Sentinel's default (180 s) would also delay a new attempt after a failover that did not complete by minutes.
failover_timeout=${REDIS_SENTINEL_FAILOVER_TIMEOUT_MS:-10000}
case "$quorum$down_after$failover_timeout" in
  *[!0-9]*) echo "sentinel: REDIS_SENTINEL_QUORUM, _DOWN_AFTER_MS and _FAILOVER_TIMEOUT_MS are numbers" >&2; exit 1 ;;
esac
# The name the other Sentinels, the data nodes and the web replicas reach this one by (Compose: the service name).
# Announcing it, not an address, keeps a Sentinel recreated with another address from counting twice.
me=${REDIS_SENTINEL_ANNOUNCE_HOSTNAME:-$(uname -n)}
case "$me" in
  *[!A-Za-z0-9.-]* | "") echo "sentinel: REDIS_SENTINEL_ANNOUNCE_HOSTNAME must be a host name" >&2; exit 1 ;;
esac

conf=/data/sentinel.conf
umask 077

# The data node that runs as the primary now, when exactly one does; nothing otherwise. The Sentinels start after
# the data nodes, which chose their roles by asking the Sentinels (entrypoint.sh): after every Sentinel was gone
# (`down` and `up`), the nodes fall back to the roles of the first start, and the Sentinels must follow them rather
# than the primary their files remember.
running_primary() {
  for node in $REDIS_HA_NODES; do
    resolves "$node" || continue
    [ "$(cli -h "$node" role | head -n 1)" = master ] && echo "$node"
  done | awk '{ n++; name = $0 } END { if (n == 1) print name }'
}

# What Sentinel saved (its id, the epochs, the primary, the replicas and Sentinels it knew), in the order Sentinel
# needs it: the primary before the lines about it. Replicas and Sentinels whose names do not resolve now (their
# containers are down) are left out: Sentinel refuses to start on a name it cannot resolve, and it learns them
# again from the primary and the hello messages once they are back.
saved_state() {
  [ -s "$conf" ] || return 0
  awk '$1 == "sentinel" && ($2 == "myid" || $2 == "current-epoch") { print 1, $0; next }
       $1 == "sentinel" && $2 == "monitor" { print 2, $0; next }
       $1 == "sentinel" && ($2 == "config-epoch" || $2 == "leader-epoch") { print 3, $0; next }
       $1 == "sentinel" && ($2 == "known-replica" || $2 == "known-sentinel") { print 4, $0 }' "$conf" \
    | sort -s -k1,1n | cut -d' ' -f2- \
    | while read -r line; do
        # shellcheck disable=SC2086 # split into its fields
        set -- $line
        case "$2" in
          known-replica) resolves "$4" || continue ;;
          known-sentinel) resolves "$4" || continue ;;
        esac
        echo "$line"
      done
}

state=$(saved_state)
remembered=$(echo "$state" | awk '$2 == "monitor" { print $4 }')
running=$(running_primary)
primary=${running:-${remembered:-$REDIS_HA_INITIAL_PRIMARY}}
if [ -n "$remembered" ] && [ "$primary" != "$remembered" ]; then
  echo "sentinel: $primary runs as the primary, not $remembered as remembered; following it" >&2
  # The replicas listed were those of the other primary: Sentinel learns the new one's from its INFO.
  state=$(echo "$state" | awk '$2 != "monitor" && $2 != "known-replica"')
else
  state=$(echo "$state" | awk '$2 != "monitor"')
fi
if ! resolves "$primary"; then
  # Sentinel would exit on it; the restart policy tries again, by which time the node may be back.
  echo "sentinel: the primary $primary does not resolve (its container is down); waiting for it" >&2
  for _ in $(seq 1 30); do resolves "$primary" && break; sleep 1; done
fi
echo "sentinel: watching $primary as the primary of $ha_master_name" >&2

# Sentinel's config, without the password: the options it has to read before the primary (resolve-hostnames
# before a monitor line with a host name), then its state, the primary's line among it.
{
  cat <<CONF
port 26379
bind 0.0.0.0 -::*
dir /data
logfile ""
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip $me
sentinel announce-port 26379
CONF
  echo "$state" | awk '$2 == "myid" || $2 == "current-epoch"'
  echo "sentinel monitor $ha_master_name $primary 6379 $quorum"
  echo "$state" | awk '$2 != "myid" && $2 != "current-epoch" && NF'
} >"$conf.new"
mv "$conf.new" "$conf"

# exec: Sentinel becomes PID 1 and gets docker stop's SIGTERM. The rest on stdin, read after the file: the
# password, and the options of the primary, which must follow its monitor line.
exec redis-server "$conf" --sentinel - <<CONF
requirepass "$password"
sentinel sentinel-pass "$password"
sentinel auth-pass $ha_master_name "$password"
sentinel rename-command $ha_master_name CONFIG $(config_command_name)
sentinel down-after-milliseconds $ha_master_name $down_after
sentinel failover-timeout $ha_master_name $failover_timeout
sentinel parallel-syncs $ha_master_name 1
CONF
