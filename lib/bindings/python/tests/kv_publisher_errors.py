"""Bad calls to a KV event publisher fail with a message naming what is wrong."""

import asyncio

from switchyard.errors import InvalidRequest
from switchyard.llm import kv_event_publisher, register_model
from switchyard.runtime import DistributedRuntime


async def main() -> None:
    runtime = DistributedRuntime.detached()
    endpoint = runtime.namespace("demo").component("kv").endpoint("generate")
    publisher = await kv_event_publisher(endpoint, block_size=4)
    assert publisher.endpoint.startswith("tcp://"), publisher.endpoint
    publisher.stored([1, 2], list(range(8)))
    publisher.removed([2])
    publisher.cleared()
    # Batches go out from a background task: wait (bounded) until all three left.
    for _ in range(100):
        if publisher.published() == (3, 0):
            break
        await asyncio.sleep(0.05)
    assert publisher.published() == (3, 0), publisher.published()
    for call, words in [
        (lambda: publisher.stored([1, 2], list(range(7))), "need 8 token ids, got 7"),
        (lambda: publisher.stored([], []), "block_hashes is empty"),
        (lambda: publisher.removed([]), "block_hashes is empty"),
    ]:
        try:
            call()
        except InvalidRequest as error:
            assert words in str(error), error
        else:
            raise AssertionError(f"no error for {words}")
    try:
        publisher.stored([-1], list(range(4)))
    except OverflowError:
        pass
    else:
        raise AssertionError("a negative block hash was accepted")
    for kwargs, words in [
        ({"block_size": 0}, "block_size must be at least 1"),
    ]:
        try:
            await kv_event_publisher(endpoint, **kwargs)
        except InvalidRequest as error:
            assert words in str(error), error
        else:
            raise AssertionError(f"no error for {words}")
    for kwargs, words in [
        ({"tokenizer": " "}, "tokenizer is empty"),
        ({"kv_cache_block_size": 0}, "kv_cache_block_size must be at least 1"),
        ({"kv_cache_block_size": 16, "kv_events": publisher}, "block_size is 4"),
    ]:
        try:
            await register_model(endpoint, "m", **kwargs)
        except InvalidRequest as error:
            assert words in str(error), error
        else:
            raise AssertionError(f"no error for {words}")
    print("ok")


if __name__ == "__main__":
    asyncio.run(main())
