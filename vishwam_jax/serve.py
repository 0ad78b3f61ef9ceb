"""Serve a model over an OpenAI-compatible HTTP API:
`python -m vishwam_jax.serve [--model PRESET|DIR] [--port 8000]`.

With no --model, serves the small Shakespeare model embedded in the package. Endpoints:
POST /v1/completions and /v1/chat/completions (streaming with "stream": true), GET /health,
GET /metrics (Prometheus). The HTTP server runs in a process of its own, beside the engine's, so
that the two never wait on one interpreter lock (--one-process keeps both in this one). Ctrl-C
stops accepting requests, lets running ones finish (up to --drain-timeout seconds), then exits.
docs/serving.md has the details.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m vishwam_jax.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model", help="preset name or converted model directory (default: the embedded Shakespeare model)"
    )
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    ap.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="parameter dtype")
    ap.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json to use instead of the model's own")
    ap.add_argument("--slots", type=int, default=32, help="requests decoded together, a power of two (default: 32)")
    ap.add_argument("--max-len", type=int, default=None, help="tokens per request, prompt + output (default: context)")
    ap.add_argument("--prefill-rows", type=int, default=4, help="requests prefilled per step (default: 4)")
    ap.add_argument(
        "--chunks", default="16,64", help="prefill chunk lengths; the largest is the prompt piece (default: 16,64)"
    )
    ap.add_argument(
        "--prefill-buckets",
        default=None,
        help="prefill row counts, e.g. 1,2,4: a lone prompt then costs one row, not --prefill-rows, but "
        "tokens may differ from a lone run's after near-ties (default: --prefill-rows only, batch-invariant)",
    )
    ap.add_argument(
        "--decode-buckets",
        default=None,
        help="decode batch sizes, e.g. 1,2,4,8,16,32: faster at low load, but tokens may then differ "
        "from a lone run's after near-ties (default: --slots only, batch-invariant)",
    )
    ap.add_argument("--pages", type=int, default=None, help="64-token cache pages (default: every slot full)")
    ap.add_argument("--max-queue", type=int, default=1024, help="waiting requests before 429 (default: 1024)")
    ap.add_argument(
        "--lookahead",
        type=int,
        default=1,
        help="decode steps dispatched before the host reads one's tokens (0: read each at once; default: 1)",
    )
    ap.add_argument(
        "--decode-steps",
        type=int,
        default=1,
        help="decode steps per dispatch: tokens per stream per host round trip; more amortize the host's "
        "per-step work, at up to that many steps' wait for a new prompt's prefill (default: 1)",
    )
    ap.add_argument(
        "--speculative",
        action="store_true",
        help="DeepSeek-V3: verify the MTP module's draft in every decode step (greedy requests: up to 2 tokens a step)",
    )
    ap.add_argument(
        "--mesh", default=None, help="serve sharded on a mesh of these axis sizes, e.g. tensor=8 or data=2,expert=4"
    )
    ap.add_argument("--rules", default=None, help="sharding rule preset for --mesh (default: from the mesh)")
    ap.add_argument("--max-tokens", type=int, default=256, help="output tokens when a request names none")
    ap.add_argument("--drain-timeout", type=float, default=10.0, help="seconds running requests get at shutdown")
    ap.add_argument("--no-warmup", action="store_true", help="compile on the first requests instead of at start")
    ap.add_argument(
        "--one-process",
        action="store_true",
        help="run the HTTP server on a thread of the engine's process instead of a process of its own",
    )
    return ap


def _ints(text: str | None) -> tuple[int, ...] | None:
    return None if text is None else tuple(int(x) for x in text.split(",") if x.strip())


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, bound as uvicorn binds (SO_REUSEADDR); OSError names the
    address. Bound before the model loads, so that a taken port costs a second, not a model load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except (OSError, OverflowError) as err:  # OverflowError: a port outside 0..65535
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {getattr(err, 'strerror', None) or err}") from None
    return sock


def run(argv=None) -> int:
    args = _parser().parse_args(argv)
    import numpy as np
    import uvicorn

    import vishwam_jax as vj
    from vishwam_jax.inference.engine_link import HttpSettings, serve_in_process
    from vishwam_jax.inference.engine_thread import EngineThread
    from vishwam_jax.inference.sampling import SAMPLING_MODES
    from vishwam_jax.inference.serving import Engine, EngineConfig
    from vishwam_jax.loading import EMBEDDED_MODELS
    from vishwam_jax.sharding import make_mesh, parse_mesh

    try:
        # Two processes: the HTTP process binds the port itself later; this only checks it is free.
        listener = _listen(args.host, args.port)
        if not args.one_process:
            listener.close()
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        config = EngineConfig(
            num_slots=args.slots,
            max_len=args.max_len,
            prefill_rows=args.prefill_rows,
            chunk_buckets=_ints(args.chunks),
            prefill_buckets=_ints(args.prefill_buckets),
            decode_buckets=_ints(args.decode_buckets),
            num_pages=args.pages,
            max_queue=args.max_queue,
            lookahead=args.lookahead,
            decode_steps=args.decode_steps,
            speculative=args.speculative,
        )
        source = args.model or str(vj.DEFAULT_MODEL_DIR)
        dtype = {"float32": np.float32, "bfloat16": "bfloat16", None: None}[args.dtype]
        mesh = None if args.mesh is None else make_mesh(**parse_mesh(args.mesh))
        model = vj.load(source, dtype=dtype, mesh=mesh, rules=args.rules if mesh is not None else None)
        if args.tokenizer:
            from vishwam_jax.tokenizer import tokenizer_from_file

            model.tokenizer = tokenizer_from_file(args.tokenizer, model.config)
        engine = Engine(model, config, tokenizer=model.tokenizer, mesh=mesh, rules=args.rules)
    except (ValueError, OSError) as err:  # MeshError and ShardingError are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.no_warmup:
        # Every sampling mode: a request's settings choose the executable, and none may compile mid-serving.
        prefills = len(engine.chunk_buckets) * len(engine.prefill_buckets)
        shapes = (prefills + len(engine.decode_buckets)) * len(SAMPLING_MODES)
        print(f"[compiling {shapes} prefill and decode executables...]", file=sys.stderr)
        engine.warmup(SAMPLING_MODES)
    directory = EMBEDDED_MODELS.get(source, source)
    model_name = model.config.get("name") or args.model or "gemma-shakespeare"
    chat_template_dir = str(directory) if _is_directory(directory) else None
    settings = HttpSettings(
        host=args.host,
        port=args.port,
        model_name=model_name,
        limits=engine.limits,
        tokenizer=model.tokenizer,
        chat_template_dir=chat_template_dir,
        default_max_tokens=args.max_tokens,
        drain_timeout_s=args.drain_timeout,
    )
    if args.one_process:
        app = settings.app(EngineThread(engine))
        config = uvicorn.Config(
            app, host=args.host, port=args.port, timeout_graceful_shutdown=int(args.drain_timeout) + 1
        )
        host, port = listener.getsockname()[:2]
        # uvicorn logs no address for a socket it is handed
        print(f"[serving on http://{host}:{port}; Ctrl-C to stop]", file=sys.stderr)
        uvicorn.Server(config).run(sockets=[listener])
        return 0
    try:
        with serve_in_process(engine, settings) as http:
            code = http.wait()
    except RuntimeError as err:  # the HTTP process did not start (uvicorn has said why: e.g. the port is taken)
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0 if code in (0, -signal.SIGTERM) else 1


def _is_directory(path) -> bool:
    from pathlib import Path

    return Path(path).expanduser().is_dir()


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
