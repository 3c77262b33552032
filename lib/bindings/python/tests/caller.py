"""A Python caller for the tests: `caller.py ENDPOINT JSON_REQUEST [--count]`
prints each item as a JSON line (or only the count and the last item), or
`error <class> <kind>` when the call raises."""

import asyncio
import json
import sys

from switchyard.errors import SwitchyardError
from switchyard.runtime import DistributedRuntime


async def main() -> None:
    runtime = DistributedRuntime.detached()
    try:
        endpoint = runtime.namespace("demo").component("backend").endpoint(sys.argv[1])
        request = json.loads(sys.argv[2])
        count_only = "--count" in sys.argv
        client = await endpoint.client()
        await client.wait_for_instances(timeout=20)
        items, last, expected = 0, None, 0
        try:
            async for item in await client.round_robin(request):
                if count_only:
                    assert item == expected, f"item {item} where {expected} was due"
                    expected += 1
                else:
                    print(json.dumps(item), flush=True)
                items, last = items + 1, item
        except SwitchyardError as error:
            print(f"error {type(error).__name__} {error.kind} {error}", flush=True)
        if count_only:
            print(f"count {items} last {last}", flush=True)
    finally:
        await runtime.shutdown()
        runtime.close()


asyncio.run(main())
