#!/bin/sh
# Starts Redis with the password from $REDIS_PASSWORD (or the file $REDIS_PASSWORD_FILE names), handed over on
# stdin so that it appears in no file, no process argument and no log. Refuses to start without one.
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
# exec: Redis becomes PID 1 and gets docker stop's SIGTERM itself, so it flushes the append-only file.
exec redis-server /etc/redis/infinite-chat.conf - <<CONF
requirepass "$password"
maxmemory $maxmemory
CONF
