#!/usr/bin/env bash
# Makes the secrets the compose stack runs with: etcd and NATS ship with
# authentication on (docs/security.md), so `docker compose up` needs them.
#
#   deploy/compose/make-secrets.sh [DIR]     # default: deploy/compose/secrets
#
# Writes into DIR (created 0700 for its owner, then opened to 0755 so the
# containers' non-root users can read what they need):
#   ca.pem                    a throw-away CA (its key, ca-key.pem, stays here)
#   etcd-server.pem/-key.pem  etcd's serving certificate (DNS etcd, localhost, 127.0.0.1)
#   etcd-client.pem/-key.pem  the client certificate every Switchyard process
#                             (and etcd's own health check) presents: etcd runs
#                             with --client-cert-auth, so no certificate, no access
#   switchyard.env            NATS_AUTH_USERNAME / NATS_AUTH_PASSWORD (random),
#                             read by nats (nats.conf refers to them) and by
#                             every Switchyard service
#
# Idempotent: files that exist are kept, so a running stack keeps working.
# Delete DIR to start over. Needs openssl.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-$here/secrets}
command -v openssl >/dev/null || { echo "make-secrets.sh: openssl is needed (apt-get install openssl)" >&2; exit 1; }
umask 077
mkdir -p "$dir"
cd "$dir"

days=825
if [ ! -f ca.pem ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -days "$days" -subj "/CN=switchyard demo CA" \
        -keyout ca-key.pem -out ca.pem 2>/dev/null
    rm -f etcd-server.pem etcd-client.pem   # a new CA invalidates the old leaves
fi

# leaf NAME SUBJECT EXTENSIONS
leaf() {
    [ -f "$1.pem" ] && return 0
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$2" -keyout "$1-key.pem" -out "$1.csr" 2>/dev/null
    printf '%s\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days "$days" \
        -extfile "$1.ext" -out "$1.pem" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}
# The compose service name, and the Kubernetes names of deploy/k8s/etcd.yaml.
leaf etcd-server etcd "subjectAltName=DNS:etcd,DNS:localhost,IP:127.0.0.1,DNS:etcd.switchyard,DNS:etcd.switchyard.svc,DNS:etcd.switchyard.svc.cluster.local,DNS:etcd-0.etcd
extendedKeyUsage=serverAuth,clientAuth"
leaf etcd-client switchyard "extendedKeyUsage=clientAuth"

if [ ! -f switchyard.env ]; then
    password=$(openssl rand -hex 24)
    printf 'NATS_AUTH_USERNAME=switchyard\nNATS_AUTH_PASSWORD=%s\n' "$password" > switchyard.env
fi

# The containers run as other users (Switchyard as uid 10001, the servers as
# their own): they need to read the certificates, the client key and the env
# file. The CA's key is never mounted and stays private.
chmod 0755 .
chmod 0644 ca.pem etcd-server.pem etcd-server-key.pem etcd-client.pem etcd-client-key.pem switchyard.env
chmod 0600 ca-key.pem
echo "secrets in $dir"
