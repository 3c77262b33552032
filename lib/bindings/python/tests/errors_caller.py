"""Sends each request of argv[1] (a JSON list) and prints, per request, the
items before the error and the error's class, kind and message."""

import asyncio
import json
import sys

from switchyard.errors import SwitchyardError
from switchyard.runtime import DistributedRuntime


async def main() -> None:
    runtime = DistributedRuntime.detached()
    endpoint = runtime.namespace("demo").component("backend").endpoint("test")
    client = await endpoint.client()
    await client.wait_for_instances(timeout=20)
    nobody = await runtime.namespace("demo").component("nobody").endpoint("home").client()
    for request in json.loads(sys.argv[1]):
        items = []
        try:
            async for item in await client.round_robin(request):
                items.append(item)
            print(json.dumps({"class": None, "items": items}), flush=True)
        except SwitchyardError as error:
            print(
                json.dumps({"class": type(error).__name__, "kind": error.kind, "message": str(error), "items": items}),
                flush=True,
            )
    # Errors the runtime itself raises, on the caller's side.
    for what, call in (
        ("direct to an unknown instance", lambda: client.direct("x", 0xDEAD)),
        ("nobody serves", lambda: nobody.wait_for_instances(timeout=0.2)),
    ):
        try:
            await call()
            print(json.dumps({"runtime": what, "class": None}), flush=True)
        except SwitchyardError as error:
            print(json.dumps({"runtime": what, "class": type(error).__name__, "kind": error.kind}), flush=True)
    await runtime.shutdown()
    runtime.close()


asyncio.run(main())
