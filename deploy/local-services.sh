#!/usr/bin/env bash
# Make sure the local Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672) answer; start them if not.
# Used by `make run`, `make test` and CI. Loopback only.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 name=$2 i
  for i in $(seq 1 120); do
    port_open "$port" && return 0
    sleep 0.5
  done
  echo "services: $name did not open 127.0.0.1:$port within 60s" >&2
  return 1
}

if port_open 6379; then
  echo "services: redis answering on 127.0.0.1:6379"
else
  command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
  mkdir -p /var/lib/redis /var/log/redis
  echo "services: starting redis"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port 6379 redis
fi

if port_open 5672; then
  echo "services: rabbitmq answering on 127.0.0.1:5672"
else
  command -v rabbitmq-server >/dev/null || { apt-get update -qq && apt-get install -y -qq rabbitmq-server; }
  echo "services: starting rabbitmq (this takes a few seconds)"
  rabbitmq-server -detached
  wait_port 5672 rabbitmq
  timeout 60 rabbitmqctl await_startup >/dev/null 2>&1 || true
fi
