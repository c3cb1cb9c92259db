# Sourced by the entry points of this image (entrypoint.sh, sentinel-entrypoint.sh): the password and what is
# derived from it, in one place, so that the data nodes and the Sentinels agree on them.

# The name of the replicated primary the Sentinels watch (profile `ha`), as the web replicas ask for it.
# shellcheck disable=SC2034 # used by the scripts that source this file
ha_master_name=infinite-chat

# Sets $password from $REDIS_PASSWORD (or the file $REDIS_PASSWORD_FILE names); refuses to go on without one.
read_password() {
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
}

# What CONFIG is called on a data node of the `ha` profile: Sentinel sends CONFIG REWRITE in the same MULTI as
# REPLICAOF during a failover, and an unknown command aborts the whole transaction, so CONFIG cannot simply be
# disabled there. A name derived from the password keeps it out of reach of anyone without the password. The prefix
# keeps the name from being a part of the password's plain SHA-256, which Redis shows as the ACL user's password.
# printf is a shell builtin: the password is in no process's arguments.
config_command_name() {
  printf 'CONFIG-%s' "$(printf 'infinite-chat CONFIG %s' "$password" | sha256sum | cut -c1-16)"
}

# Runs redis-cli with the password in REDISCLI_AUTH (not on its command line), bounded to 2 s, replies unwrapped.
cli() {
  REDISCLI_AUTH=$password timeout 2 redis-cli "$@" 2>/dev/null | tr -d '\r'
}

# Succeeds when a host name resolves now (Compose's DNS knows only running containers).
resolves() {
  [ -n "$(timeout 2 getent ahostsv4 "$1" | awk 'NR == 1 { print $1 }')" ]
}
