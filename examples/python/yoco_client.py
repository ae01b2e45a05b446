#!/usr/bin/env python3
"""A client for yoco's public gRPC API (yoco.v1.Generation) using grpcio, the official gRPC
library: the API must work from a client we did not write.

    pip install -r requirements.txt
    python yoco_client.py --addr 127.0.0.1:50051 generate --prompt "The capital of France is"
    python yoco_client.py --addr 127.0.0.1:50051 generate --prompt-ids 1,2,3 --json
    python yoco_client.py --addr 127.0.0.1:50051 info
    python yoco_client.py --addr 127.0.0.1:50051 tokenize "hello world"
    python yoco_client.py --addr 127.0.0.1:50051 reflect

The Python stubs are generated from ../../proto with grpcio-tools on first use (into a cache
directory), so they always match the server's .proto files.
"""

import argparse
import hashlib
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

import grpc

PROTO_ROOT = Path(__file__).resolve().parent.parent.parent / "proto"
PROTO = "yoco/v1/generation.proto"


def load_stubs():
    """Compiles generation.proto with grpcio-tools (once per version of the file)."""
    from grpc_tools import protoc

    source = (PROTO_ROOT / PROTO).read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"yoco-python-stubs-{digest}"
    if not (out / "yoco" / "v1" / "generation_pb2_grpc.py").exists():
        tmp = Path(tempfile.mkdtemp(prefix="yoco-stubs-"))
        well_known = Path(importlib.import_module("grpc_tools").__file__).parent / "_proto"
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                PROTO,
            ]
        )
        if code != 0:
            sys.exit(f"protoc failed on {PROTO_ROOT / PROTO}")
        try:
            os.replace(tmp, out)
        except OSError:
            pass  # another process made it first
    sys.path.insert(0, str(out))
    pb = importlib.import_module("yoco.v1.generation_pb2")
    rpc = importlib.import_module("yoco.v1.generation_pb2_grpc")
    return pb, rpc


FINISH = {1: "length", 2: "stop", 3: "cancelled", 4: "error"}


def generate(stub, pb, args):
    req = pb.GenerateRequest(
        max_tokens=args.max_tokens,
        stop=args.stop or [],
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
        prompt_logprobs=args.prompt_logprobs,
    )
    if args.prompt is not None:
        req.text = args.prompt
    else:
        req.token_ids.ids.extend(int(t) for t in args.prompt_ids.split(","))
    req.sampling.temperature = args.temperature
    if args.top_p is not None:
        req.sampling.top_p = args.top_p
    req.sampling.top_k = args.top_k
    if args.seed is not None:
        req.sampling.seed = args.seed

    tokens, logprobs, text, finished, request_id = [], [], [], None, ""
    try:
        for msg in stub.Generate(req, timeout=args.timeout):
            request_id = msg.request_id
            kind = msg.WhichOneof("event")
            if kind == "progress" and not args.json:
                p = msg.progress
                print(f"prefill {p.prefilled_tokens}/{p.prompt_tokens}", file=sys.stderr)
            elif kind == "tokens":
                for t in msg.tokens.tokens:
                    tokens.append(t.id)
                    logprobs.append(t.logprob)
                text.append(msg.tokens.text)
                if not args.json:
                    print(msg.tokens.text, end="", flush=True)
            elif kind == "finished":
                finished = msg.finished
    except grpc.RpcError as e:
        if finished is None:
            sys.exit(f"{e.code().name}: {e.details()}")
    if finished is None:
        sys.exit("the stream ended without a final message")
    reason = FINISH.get(finished.reason, "unspecified")
    if args.json:
        print(
            json.dumps(
                {
                    "request_id": request_id,
                    "tokens": tokens,
                    "logprobs": logprobs,
                    "text": "".join(text),
                    "finish_reason": reason,
                    "error": finished.error,
                    "seed": finished.seed,
                    "usage": {
                        "prompt_tokens": finished.usage.prompt_tokens,
                        "completion_tokens": finished.usage.completion_tokens,
                    },
                    "time_to_first_token_seconds": finished.timing.time_to_first_token_seconds,
                }
            )
        )
    else:
        print()
        print(f"[{reason}; {finished.usage.completion_tokens} tokens]", file=sys.stderr)
    return 1 if reason == "error" else 0


def info(channel, stub, pb):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="yoco.v1.Generation"), timeout=10
    )
    i = stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
    print(
        json.dumps(
            {
                "health": health_pb2.HealthCheckResponse.ServingStatus.Name(health.status),
                "model": i.model,
                "vocab_size": i.vocab_size,
                "tokenizer": i.tokenizer,
                "world": i.world,
                "transport": i.transport,
                "cache_bytes_per_token": i.cache_bytes_per_token,
                "cache_capacity_tokens": i.cache_capacity_tokens,
                "ranks": [
                    {"rank": r.rank, "address": r.address, "cache_used_bytes": r.cache_used_bytes}
                    for r in i.ranks
                ],
            }
        )
    )
    return 0


def reflect(channel):
    """What the server says of itself through gRPC reflection, read by grpcio's own reflection
    client (which speaks v1alpha): no stubs, nothing compiled from our .proto files."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(channel)
    pool = DescriptorPool(db)
    services = sorted(db.get_services())
    generation = pool.FindServiceByName("yoco.v1.Generation")
    request = pool.FindMessageTypeByName("yoco.v1.GenerateRequest")
    print(
        json.dumps(
            {
                "services": services,
                "methods": [m.name for m in generation.methods],
                "generate_request_fields": [f.name for f in request.fields],
            }
        )
    )
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--addr", default="127.0.0.1:50051")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-ids", help="comma-separated token ids")
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=0)
    g.add_argument("--prompt-logprobs", action="store_true")
    g.add_argument("--timeout", type=float, help="seconds; the server cancels the request after it")
    g.add_argument("--json", action="store_true")
    t = sub.add_parser("tokenize")
    t.add_argument("text")
    sub.add_parser("info")
    sub.add_parser("reflect")
    args = ap.parse_args()

    if args.command == "reflect":
        with grpc.insecure_channel(args.addr) as channel:
            return reflect(channel)
    pb, rpc = load_stubs()
    with grpc.insecure_channel(args.addr, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = rpc.GenerationStub(channel)
        if args.command == "generate":
            return generate(stub, pb, args)
        if args.command == "tokenize":
            print(json.dumps(list(stub.Tokenize(pb.TokenizeRequest(text=args.text)).ids)))
            return 0
        return info(channel, stub, pb)


if __name__ == "__main__":
    sys.exit(main())
