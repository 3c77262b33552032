#!/usr/bin/env python3
"""The Kubernetes manifests, checked as far as a machine without a cluster allows.

    check_k8s.py schema DIR [EXTRA.yaml ...]
        Every document of DIR/*.yaml (and EXTRA files, e.g. the Secrets that
        make-secrets.sh prints) against the Kubernetes 1.33 OpenAPI schema
        (k8s-openapi's `v1_33`, what the kube crate is built for here), in
        strict mode: unknown fields fail. Schemas come from the PyPI package
        kubernetes-validate 1.33.1, offline. Kinds with no schema there (the
        Prometheus Operator's ServiceMonitor/PodMonitor) are named as not
        checked. Then proves it can fail: a Deployment with a misspelled
        field must be refused.

    check_k8s.py play DIR OUT.yaml --secrets SECRETS_DIR
        Writes a `podman kube play` file running the manifests' etcd, NATS,
        frontend and worker containers (one Pod per Deployment or
        StatefulSet, replicas ignored) with
        their command, args, ports, probes, security context and environment
        as written, except what podman 4.3 or the missing API server cannot
        give, each substitution printed:
          - fieldRef status.podIP / metadata.namespace (podman refuses them):
            the Pod's name (which resolves on the podman network) / switchyard;
          - secretKeyRef switchyard-nats: the values of SECRETS_DIR/switchyard.env;
          - Secret volumes: a hostPath with the Secret's files;
          - DYN_DISCOVERY_BACKEND=kubernetes (needs an API server): the etcd
            switch exactly as etcd.yaml's header documents it, against the
            compose stack's etcd.

    check_k8s.py verify OUT.yaml --prober CONTAINER
        With those Pods running (on the compose network): every container
        runs; every httpGet probe answers, asked from CONTAINER (curl, same
        network) at the Pod's name as the kubelet would at its IP; the
        Switchyard containers run as uid 10001 on a read-only root
        filesystem; the worker is registered and serves a chat completion
        sent to the frontend Pod; the NATS Pod refuses a client without
        credentials; the etcd Pod refuses a client without a certificate and
        accepts one its CA signed.
"""

import copy
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import yaml

K8S_VERSION = "1.33.0"
# Pods and volumes of the play are named with this prefix: podman 4.3 makes
# each emptyDir and ConfigMap volume a named volume under the volume's own
# name, shared by every Pod that uses the name, and left behind by
# `podman kube down`; the prefix keeps them apart and lets the test remove them.
PREFIX = "sy-kube-"

# The files of each Secret the manifests mount, as make-secrets.sh names them.
SECRET_FILES = {
    "switchyard-etcd-client": ["ca.pem", "etcd-client.pem", "etcd-client-key.pem"],
    "switchyard-etcd-tls": ["ca.pem", "etcd-server.pem", "etcd-server-key.pem"],
}


def documents(paths):
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    yield path, doc


def schema(args):
    import kubernetes_validate

    directory, extra = args[0], args[1:]
    paths = sorted(glob.glob(os.path.join(directory, "*.yaml"))) + extra
    failures, unchecked, checked = [], [], 0
    deployment = None
    for path, doc in documents(paths):
        name = f"{path}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            checked += 1
        except kubernetes_validate.SchemaNotFoundError:
            unchecked.append(f"{name} ({doc.get('apiVersion')}: no schema offline)")
        except kubernetes_validate.ValidationError as error:
            failures.append(f"{name}: {error.message} at {'.'.join(str(p) for p in error.path)}")
        if doc.get("kind") == "Deployment" and deployment is None:
            deployment = doc
    print(f"schema {K8S_VERSION} (strict): {checked} objects valid")
    for item in unchecked:
        print(f"  not checked: {item}")
    # The checker can fail: a misspelled field in a real Deployment.
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    try:
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
        failures.append("a Deployment with the misspelled field livenesProbe passed the schema check")
    except kubernetes_validate.ValidationError as error:
        print(f"  a misspelled field is refused, as it should be: {error.message}")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


def etcd_switch(directory):
    """The variables etcd.yaml's header says to set for the etcd backend."""
    with open(os.path.join(directory, "etcd.yaml")) as f:
        header = f.read().split("apiVersion:")[0]
    switch = dict(re.findall(r"^#\s+((?:DYN_DISCOVERY_BACKEND|ETCD_[A-Z_]+))=(\S+)\s*$", header, re.M))
    if switch.get("DYN_DISCOVERY_BACKEND") != "etcd" or "ETCD_ENDPOINTS" not in switch:
        raise SystemExit(f"etcd.yaml's header no longer documents the etcd switch: {switch}")
    return switch


def play(args):
    directory, out = args[0], args[1]
    secrets = args[args.index("--secrets") + 1]
    env_file = dict(
        line.split("=", 1) for line in open(os.path.join(secrets, "switchyard.env")).read().split() if "=" in line
    )
    nats_secret = {"username": env_file["NATS_AUTH_USERNAME"], "password": env_file["NATS_AUTH_PASSWORD"]}
    switch = etcd_switch(directory)
    # Each Secret volume becomes a directory with the Secret's files (the
    # keys deploy/k8s/make-secrets.sh gives it), copied from SECRETS_DIR.
    secret_dirs = {}
    for secret, files in SECRET_FILES.items():
        secret_dirs[secret] = os.path.join(os.path.dirname(os.path.abspath(out)), secret)
        os.makedirs(secret_dirs[secret], exist_ok=True)
        for name in files:
            shutil.copy(os.path.join(secrets, name), secret_dirs[secret])
            os.chmod(os.path.join(secret_dirs[secret], name), 0o644)

    objects = []
    notes = []
    for path, doc in documents(sorted(glob.glob(os.path.join(directory, "*.yaml")))):
        kind = doc.get("kind")
        if kind == "ConfigMap":
            cm = copy.deepcopy(doc)
            cm["metadata"].pop("namespace", None)
            cm["metadata"]["name"] = PREFIX + cm["metadata"]["name"]
            objects.append(cm)
        if kind not in ("Deployment", "StatefulSet"):
            continue
        pod_name = PREFIX + doc["metadata"]["name"]
        template = copy.deepcopy(doc["spec"]["template"])
        metadata = template.get("metadata", {})
        metadata["name"] = pod_name
        spec = template["spec"]
        spec.pop("serviceAccountName", None)
        for container in spec["containers"]:
            env = []
            discovery_switched = False
            for var in container.get("env", []):
                source = var.get("valueFrom", {})
                field = source.get("fieldRef", {}).get("fieldPath")
                secret = source.get("secretKeyRef")
                if field == "status.podIP":
                    env.append({"name": var["name"], "value": pod_name})
                    notes.append(f"{pod_name}: {var['name']} from status.podIP -> {pod_name} (the Pod's name)")
                elif field == "metadata.namespace":
                    env.append({"name": var["name"], "value": "switchyard"})
                    notes.append(f"{pod_name}: {var['name']} from metadata.namespace -> switchyard")
                elif secret:
                    if secret["name"] != "switchyard-nats":
                        raise SystemExit(f"{path}: unknown Secret {secret['name']}")
                    env.append({"name": var["name"], "value": nats_secret[secret["key"]]})
                    notes.append(f"{pod_name}: {var['name']} from Secret switchyard-nats/{secret['key']} -> its value")
                elif var["name"] == "DYN_DISCOVERY_BACKEND" and var.get("value") == "kubernetes":
                    discovery_switched = True
                    for key, value in switch.items():
                        env.append({"name": key, "value": value})
                    notes.append(f"{pod_name}: DYN_DISCOVERY_BACKEND=kubernetes -> etcd.yaml's switch {switch}")
                else:
                    env.append(var)
            if discovery_switched:
                # Names etcd.yaml's switch sets must not be given twice.
                names = [v["name"] for v in env]
                assert len(names) == len(set(names)), names
            container["env"] = env
        renamed = {}
        for volume in spec.get("volumes", []):
            renamed[volume["name"]] = f"{pod_name}-{volume['name']}"
            volume["name"] = renamed[volume["name"]]
            if "configMap" in volume:
                volume["configMap"]["name"] = PREFIX + volume["configMap"]["name"]
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                mount["name"] = renamed[mount["name"]]
        if renamed:
            notes.append(f"{pod_name}: volumes renamed {pod_name}-NAME, ConfigMaps {PREFIX}NAME (podman names volumes after them)")
        for volume in spec.get("volumes", []):
            secret = volume.get("secret", {}).get("secretName")
            if secret:
                if secret not in secret_dirs:
                    raise SystemExit(f"{path}: unknown Secret volume {secret}")
                volume.pop("secret")
                volume["hostPath"] = {"path": secret_dirs[secret], "type": "Directory"}
                notes.append(f"{pod_name}: Secret volume {secret} -> hostPath with its files")
        objects.append({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
    with open(out, "w") as f:
        yaml.safe_dump_all(objects, f, sort_keys=False)
    for note in notes:
        print(f"  substituted: {note}")
    print(f"wrote {out}: {', '.join(o['metadata']['name'] for o in objects)}")
    return 0


def podman(*args, check=True, timeout=30):
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: {result.stderr.strip() or result.stdout.strip()}")
    return result


def eventually(what, seconds, attempt):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return attempt()
        except Exception as error:  # noqa: BLE001 - reported with the deadline
            if time.monotonic() > deadline:
                raise SystemExit(f"FAIL: {what}: not within {seconds}s: {error}")
            time.sleep(1)


def http_in(container, url):
    """GET url from inside container (curl, or wget in the NATS image)."""
    script = f"if command -v curl >/dev/null; then curl -fsS --max-time 5 '{url}'; else wget -q -T 5 -O- '{url}'; fi"
    return podman("exec", container, "sh", "-c", script).stdout


def verify(args):
    # A container with curl on the same network, to probe from.
    prober = args[args.index("--prober") + 1]
    with open(args[0]) as f:
        pods = [o for o in yaml.safe_load_all(f) if o and o["kind"] == "Pod"]
    by_role = {}
    for pod in pods:
        for container in pod["spec"]["containers"]:
            name = f"{pod['metadata']['name']}-{container['name']}"
            by_role[container["name"]] = name

            def running(name=name):
                state = podman("inspect", "-f", "{{.State.Status}}", name).stdout.strip()
                assert state == "running", f"{name} is {state}; logs: {podman('logs', '--tail', '20', name, check=False).stderr}"

            eventually(f"{name} running", 60, running)
            ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            for probe in ["livenessProbe", "readinessProbe"]:
                get = container.get(probe, {}).get("httpGet")
                if not get:
                    continue
                port = ports.get(get["port"], get["port"])
                # From another container, as the kubelet probes from outside
                # the Pod: the port must listen on the Pod's address.
                url = f"http://{pod['metadata']['name']}:{port}{get['path']}"
                eventually(f"{name} {probe} {url}", 60, lambda url=url: http_in(prober, url))
                print(f"{name}: {probe} {get['path']} on port {get['port']} ({port}) answers from outside the Pod")
            security = container.get("securityContext", {})
            if "switchyard" in container["image"]:
                uid = podman("exec", name, "id", "-u").stdout.strip()
                want = str(pod["spec"].get("securityContext", {}).get("runAsUser"))
                assert uid == want, f"{name} runs as uid {uid}, the manifest says {want}"
                if security.get("readOnlyRootFilesystem"):
                    wrote = podman("exec", name, "sh", "-c", "touch /probe-write", check=False)
                    assert wrote.returncode != 0, f"{name}: the root filesystem is writable"
                    podman("exec", name, "sh", "-c", "touch /tmp/probe-write")  # the emptyDir is
                print(f"{name}: uid {uid}, read-only root filesystem, writable /tmp")

    frontend, worker, nats, etcd = by_role["frontend"], by_role["worker"], by_role["nats"], by_role["etcd"]
    worker_pod = worker.rsplit("-", 1)[0]

    def registered():
        out = podman("exec", frontend, "switchyard", "instances").stdout
        assert worker_pod in out, out
        return out

    print(eventually(f"{worker_pod} in discovery", 60, registered))
    body = json.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    for _ in range(12):
        answer = podman("exec", frontend, "curl", "-fsS", "--max-time", "10", "-H", "Content-Type: application/json",
                        "-d", body, "http://127.0.0.1:8000/v1/chat/completions").stdout
        assert json.loads(answer)["choices"][0]["message"]["content"], answer
    print(f"{frontend}: 12 chat completions answered")

    def served():
        metrics = http_in(worker, "http://127.0.0.1:9090/metrics")
        total = sum(float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("dynamo_component_requests_total"))
        assert total > 0, "the worker Pod served no request"
        return total

    print(f"{worker}: served {eventually('requests on the worker Pod', 20, served):.0f} requests (its /metrics)")
    probe = ('exec 3<>/dev/tcp/127.0.0.1/4222; read -r -t 5 info <&3; '
             'printf "CONNECT {\\"verbose\\":false}\\r\\nPING\\r\\n" >&3; read -r -t 5 reply <&3; echo "$reply"')
    reply = podman("exec", nats, "bash", "-c", probe).stdout.strip()
    assert "Authorization Violation" in reply, f"the NATS Pod accepted a client without credentials: {reply}"
    print(f"{nats}: refuses a client without credentials ({reply})")

    # etcd.yaml: TLS with client certificates on 2379 (the probes above used
    # the plain metrics listener on 2381).
    etcdctl = ["exec", etcd, "etcdctl", "--endpoints=https://127.0.0.1:2379", "--cacert=/etc/etcd/tls/ca.pem",
               "--command-timeout=5s"]
    refused = podman(*etcdctl, "get", "--prefix", "", check=False, timeout=20)
    assert refused.returncode != 0, f"the etcd Pod answered a client without a certificate: {refused.stdout}"
    keyed = podman(*etcdctl, "--cert=/etc/etcd/tls/etcd-server.pem", "--key=/etc/etcd/tls/etcd-server-key.pem",
                   "endpoint", "health", check=False, timeout=20)
    assert keyed.returncode == 0, f"the etcd Pod refused a certificate from its CA: {keyed.stderr}"
    print(f"{etcd}: TLS on 2379 refuses a client without a certificate, accepts one from its CA")
    return 0


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in {"schema", "play", "verify"}:
        raise SystemExit(__doc__)
    command = {"schema": schema, "play": play, "verify": verify}[sys.argv[1]]
    sys.exit(command(sys.argv[2:]))


if __name__ == "__main__":
    main()
