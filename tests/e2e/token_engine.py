"""A small OpenAI server in vLLM's token dialect, over llama-cpp-python's Llama.

llama-cpp-python's own server takes no token-id prompts and reports no
token ids, so an answer cut off on it cannot continue. vLLM can: its
`/v1/completions` takes `"prompt": [ids]`, and with `"return_token_ids":
true` every chunk carries the ids of its tokens (`token_ids`) and the first
one the prompt's (`prompt_token_ids`). No engine with that interface runs
without a GPU, so this server offers it over the same real model, tokenizer
and greedy decoding (llama.cpp underneath), for the real-engine suite
(tests/e2e/engines.rs) to migrate answers from token ids.

Only what the suite needs: greedy decoding (any temperature is read as 0),
`max_tokens`, end-of-generation tokens, streaming with usage, and the chat
template from the GGUF. One request at a time. Usage:

    python token_engine.py --model FILE.gguf --alias NAME --host 127.0.0.1 --port P
"""

import argparse
import json
import threading
import time
import uuid

import jinja2
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from llama_cpp import Llama
from starlette.concurrency import run_in_threadpool

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--alias", required=True)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, required=True)
args = parser.parse_args()

llm = Llama(model_path=args.model, n_ctx=2048, n_threads=1, verbose=False)
# The model runs one request at a time; the others wait for it.
turn = threading.Lock()
template = jinja2.Environment().from_string(llm.metadata["tokenizer.chat_template"])
end_ids = {llm.token_eos()} | {
    ids[0]
    for ids in (llm.tokenize(t.encode(), add_bos=False, special=True) for t in ("<|im_end|>", "<|endoftext|>"))
    if len(ids) == 1
}
app = FastAPI()


@app.get("/health")
def health():
    return {}


@app.get("/v1/models")
def models():
    return {"object": "list", "data": [{"id": args.alias, "object": "model", "max_model_len": 2048}]}


def error(status, message):
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)


def generation(prompt_ids, max_tokens):
    """Yields (token id, its bytes) greedily until an end token or max_tokens."""
    count = 0
    for token in llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        if token in end_ids or count >= max_tokens:
            return
        count += 1
        yield token, llm.detokenize([token])


async def answer(request, prompt_ids, chat):
    body = await request.json()
    max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16
    if len(prompt_ids) + max_tokens > 2048:
        return error(400, "prompt and max_tokens exceed the context of 2048 tokens")
    with_ids = bool(body.get("return_token_ids"))
    created, name = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text, ids, finish=None, first=False):
        choice = {"index": 0, "finish_reason": finish}
        if chat:
            choice["delta"] = {"content": text} if text or not finish else {}
        else:
            choice["text"] = text
        if with_ids:
            choice["token_ids"] = ids
            if first:
                choice["prompt_token_ids"] = prompt_ids
        return {"id": name, "object": kind, "created": created, "model": args.alias, "choices": [choice]}

    if not body.get("stream"):
        def run():
            with turn:
                return list(generation(prompt_ids, max_tokens))

        tokens = await run_in_threadpool(run)
        text = b"".join(piece for _, piece in tokens).decode("utf-8", "replace")
        finish = "length" if len(tokens) >= max_tokens else "stop"
        whole = chunk(text, [t for t, _ in tokens], finish, first=True)
        whole["usage"] = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(tokens),
                          "total_tokens": len(prompt_ids) + len(tokens)}
        return whole

    async def events():
        await run_in_threadpool(turn.acquire)
        try:
            steps, held, count = generation(prompt_ids, max_tokens), b"", 0
            while True:
                step = await run_in_threadpool(next, steps, None)
                if step is None:
                    break
                token, piece = step
                count += 1
                held += piece
                try:  # a character split across tokens waits for its end
                    text, held = held.decode("utf-8"), b""
                except UnicodeDecodeError:
                    text = ""
                yield "data: " + json.dumps(chunk(text, [token], first=count == 1)) + "\n\n"
            finish = "length" if count >= max_tokens else "stop"
            yield "data: " + json.dumps(chunk(held.decode("utf-8", "replace"), [], finish, first=count == 0)) + "\n\n"
            usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": count,
                     "total_tokens": len(prompt_ids) + count}
            yield "data: " + json.dumps({"id": name, "object": kind, "created": created, "model": args.alias,
                                         "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client left: generation stops here
            turn.release()

    return StreamingResponse(events(), media_type="text/event-stream")


@app.post("/v1/completions")
async def completions(request: Request):
    body = await request.json()
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        ids = prompt
    elif isinstance(prompt, str):
        ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    else:
        return error(400, "prompt must be a string or a list of token ids")
    return await answer(request, ids, chat=False)


@app.post("/v1/chat/completions")
async def chat_completions(request: Request):
    body = await request.json()
    text = template.render(messages=body.get("messages", []), add_generation_prompt=True)
    ids = llm.tokenize(text.encode(), add_bos=False, special=True)
    return await answer(request, ids, chat=True)


uvicorn.run(app, host=args.host, port=args.port, log_level="info")
