#!/usr/bin/env bash
# Prints the Secrets deploy/k8s needs, for `kubectl apply -f -`:
#
#   deploy/k8s/make-secrets.sh [DIR] | kubectl apply -f -
#
#   switchyard-nats         username, password: NATS authorization (nats.yaml)
#                           and what the frontend and workers connect with
#   switchyard-etcd-tls     ca.pem, etcd-server.pem, etcd-server-key.pem:
#                           etcd's serving certificate and the CA it checks
#                           client certificates against (etcd.yaml)
#   switchyard-etcd-client  ca.pem, etcd-client.pem, etcd-client-key.pem: what
#                           a Switchyard Pod presents to etcd (only used with
#                           DYN_DISCOVERY_BACKEND=etcd)
#
# The files come from deploy/compose/make-secrets.sh (a throw-away CA, random
# password), kept in DIR (default deploy/k8s/secrets, ignored by git) so that
# running this again prints the same Secrets. For production, issue the
# certificates from your own CA (cert-manager) and keep the password in your
# secret store; the Secret names and keys are what the manifests expect.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-$here/secrets}
"$here/../compose/make-secrets.sh" "$dir" >&2
b64() { base64 -w0 < "$1"; }
# shellcheck disable=SC1091
. "$dir/switchyard.env"
secret() {  # NAME then KEY=FILE... or KEY:=VALUE...
    local name=$1; shift
    printf -- '---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: %s\n  namespace: switchyard\n  labels:\n    app.kubernetes.io/part-of: switchyard\ntype: Opaque\ndata:\n' "$name"
    for pair in "$@"; do
        case $pair in
            *:=*) printf '  %s: %s\n' "${pair%%:=*}" "$(printf '%s' "${pair#*:=}" | base64 -w0)" ;;
            *)    printf '  %s: %s\n' "${pair%%=*}" "$(b64 "$dir/${pair#*=}")" ;;
        esac
    done
}
secret switchyard-nats "username:=$NATS_AUTH_USERNAME" "password:=$NATS_AUTH_PASSWORD"
secret switchyard-etcd-tls ca.pem=ca.pem etcd-server.pem=etcd-server.pem etcd-server-key.pem=etcd-server-key.pem
secret switchyard-etcd-client ca.pem=ca.pem etcd-client.pem=etcd-client.pem etcd-client-key.pem=etcd-client-key.pem
