#!/bin/sh
# Like the official image: RABBITMQ_DEFAULT_USER/PASS create the first account (when the data
# volume is new); AMQP on 5672 and the management API on 15672, from any address.
set -eu
{
  echo "loopback_users = none"
  echo "listeners.tcp.default = 5672"
  echo "management.tcp.port = 15672"
  [ -n "${RABBITMQ_DEFAULT_USER:-}" ] && echo "default_user = ${RABBITMQ_DEFAULT_USER}"
  [ -n "${RABBITMQ_DEFAULT_PASS:-}" ] && echo "default_pass = ${RABBITMQ_DEFAULT_PASS}"
  echo "default_user_tags.administrator = true"
} > /etc/rabbitmq/rabbitmq.conf
chown -R rabbitmq:rabbitmq /var/lib/rabbitmq
# as the rabbitmq user, without the Debian wrapper's su: SIGTERM reaches the node itself
exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups /usr/lib/rabbitmq/bin/rabbitmq-server "$@"
