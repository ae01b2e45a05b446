#!/usr/bin/env python3
"""yoco's HTTP API from the official `openai` Python client (OpenAI-compatible /v1/completions).

    python openai_client.py --base-url http://127.0.0.1:8000/v1 --prompt "Hello" --max-tokens 16

Prints one JSON object: the model list, a completion, the same completion streamed, and the
error an invalid request gets.
"""

import argparse
import json
import urllib.request

import openai


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--prompt", default="Hello")
    ap.add_argument("--prompt-ids", help="comma-separated token ids instead of --prompt")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--chat", help="also send this as a user message to /v1/chat/completions")
    args = ap.parse_args()
    prompt = [int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids else args.prompt

    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    common = dict(model=model, prompt=prompt, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    done = client.completions.create(**common, logprobs=2)
    streamed = []
    finish = None
    streamed_usage = None
    # With include_usage the last chunk has no choices, only the usage (load generators read it).
    for chunk in client.completions.create(**common, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            streamed_usage = {"prompt_tokens": chunk.usage.prompt_tokens, "completion_tokens": chunk.usage.completion_tokens}
        if chunk.choices:
            streamed.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
    try:
        client.completions.create(model=model, prompt=prompt, max_tokens=0)
        error = None
    except openai.BadRequestError as e:
        error = {"status": e.status_code, "message": e.message}
    chat = None
    if args.chat:
        chat_args = dict(
            model=model,
            messages=[{"role": "user", "content": args.chat}],
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
        )
        reply = client.chat.completions.create(**chat_args)
        chunks = list(client.chat.completions.create(**chat_args, stream=True, stream_options={"include_usage": True}))
        streamed_reply = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        chat_usage = chunks[-1].usage
        chat = {
            "content": reply.choices[0].message.content,
            "role": reply.choices[0].message.role,
            "finish_reason": reply.choices[0].finish_reason,
            "streamed": streamed_reply,
            "streamed_usage": {"prompt_tokens": chat_usage.prompt_tokens, "completion_tokens": chat_usage.completion_tokens},
        }
    root = args.base_url.rsplit("/v1", 1)[0]
    ready = json.load(urllib.request.urlopen(f"{root}/ready"))
    print(
        json.dumps(
            {
                "model": model,
                "text": done.choices[0].text,
                "finish_reason": done.choices[0].finish_reason,
                "token_logprobs": done.choices[0].logprobs.token_logprobs,
                "usage": {"prompt_tokens": done.usage.prompt_tokens, "completion_tokens": done.usage.completion_tokens},
                "streamed_text": "".join(streamed),
                "streamed_finish_reason": finish,
                "streamed_usage": streamed_usage,
                "error": error,
                "ready": ready,
                "chat": chat,
            }
        )
    )


if __name__ == "__main__":
    main()
