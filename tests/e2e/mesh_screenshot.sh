#!/bin/sh
# Regenerates the mesh page's screenshot in docs/observability.md
# (`make mesh-screenshot`): `switchyard run` with three workers in KV mode
# on a free loopback port, a few requests sharing a prompt prefix (some
# still running when the picture is taken), then headless Chromium through
# tests/e2e/mesh_page.py. Stops the process it started, whatever happens.
#
#   mesh_screenshot.sh SWITCHYARD_BINARY OUTPUT_PNG
set -eu
binary=$1
out=$2
here=$(dirname "$0")
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
# Slowed down five times, so that requests are still running for the picture.
"$binary" run --num-workers 3 --router-mode kv --speedup-ratio 0.2 --http-host 127.0.0.1 --http-port "$port" >/dev/null 2>&1 &
run=$!
trap 'kill $run 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 100); do
    curl -sf "$url/api/mesh" >/dev/null 2>&1 && break
    sleep 0.1
done
ask() { # request id, prompt, max tokens
    curl -s -m 60 "$url/v1/chat/completions" -H 'Content-Type: application/json' -H "x-request-id: $1" \
        -d "{\"model\":\"mock-model\",\"max_tokens\":$3,\"messages\":[{\"role\":\"user\",\"content\":\"$2\"}]}" >/dev/null
}
# A shared system prompt of a few KV blocks (the mocker's are 64 tokens), so
# that later requests find it cached on the worker that saw it first.
paragraph="You are a helpful assistant for the switchyard railway museum. Answer briefly, cite the exhibit, and say which hall it stands in. Visitors may be children, so keep it friendly and plain."
system="$paragraph $paragraph $paragraph $paragraph $paragraph $paragraph"
ask demo-1 "$system Where is the steam engine?" 8
ask demo-2 "$system Where is the steam engine's tender?" 8
ask demo-3 "Tell me a long story about signal boxes and the people who worked in them." 8
for i in 4 5 6 7 8 9 10 11; do ask "demo-$i" "$system Question number $i about timetables." 300 & sleep 0.5; done
ids=$(curl -s "$url/api/mesh" | python3 -c 'import json, sys; print(",".join(i["id"] for i in json.load(sys.stdin)["models"][0]["instances"]))')
python3 "$here/mesh_page.py" "$url/" --model mock-model --ids "$ids" --screenshot "$out" --settle 3
