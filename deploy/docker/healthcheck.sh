#!/bin/bash
# autoglm-healthcheck [PATH]: the image's HEALTHCHECK. GET http://127.0.0.1:$AUTOGLM_PORT/PATH
# (default /health; port default 8000) and succeed on a 200, printing the status line (docker
# keeps it in `docker inspect`'s .State.Health.Log). Bash's /dev/tcp and nothing else: the runtime
# image has no curl. Plain HTTP only: with --tls-cert, give the container a --health-cmd of its own.
set -u
path=${1:-/health}
port=${AUTOGLM_PORT:-8000}
if [ -n "${AUTOGLM_TLS_CERT:-}" ]; then
  echo "autoglm-healthcheck speaks plain HTTP and TLS is on: override the health check" >&2
  exit 1
fi
exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
printf 'GET %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' "$path" >&3
IFS= read -r -t 5 status <&3 || { echo "no answer from 127.0.0.1:$port within 5 s" >&2; exit 1; }
exec 3<&-
status=${status%$'\r'}
echo "GET $path: $status"
case $status in
  "HTTP/1."?" 200 "*) exit 0 ;;
  *) exit 1 ;;
esac
