"""``distillsr serve``: the upscaling service and its web page over HTTP (see distillsr.serve)."""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve upscaling over HTTP, with a web page",
                       description="Run the upscaling service: POST /v1/upscale, GET /v1/models, "
                       "/healthz, /metrics, and a web page at /. Needs the serve extra "
                       "(pip install \"distillsr[serve]\").")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="weights for requests that name none (default: the best installed weights "
                   "for the request's scale)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N, or several separated by commas (one worker each)")
    p.add_argument("--max-queue", type=int, default=None, metavar="N",
                   help="requests that may wait for a worker; more get 429 (default 8)")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N",
                   help="largest input in pixels, checked from the header (default 4,000,000; 0 = no limit)")
    p.add_argument("--max-upload-mb", type=float, default=None, metavar="N",
                   help="largest request body in MiB (default 25)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="seconds from a request's arrival to its answer; 504 after (default 120)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..serve import ServeDependencyError, require_serve_deps
    try:
        require_serve_deps()
    except ServeDependencyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn
    from ..serve import app as serve_app
    options = {"max_queue": args.max_queue, "max_pixels": args.max_pixels,
               "max_upload_mb": args.max_upload_mb, "timeout": args.timeout}
    if args.max_queue is not None and args.max_queue < 1:
        print("error: --max-queue must be at least 1", file=sys.stderr)
        return 2
    if args.max_pixels is not None and args.max_pixels < 0:
        print("error: --max-pixels must be >= 0 (0 = no limit)", file=sys.stderr)
        return 2
    if not 1 <= args.port <= 65535:
        print(f"error: --port must be in 1..65535, got {args.port}", file=sys.stderr)
        return 2
    try:
        app = serve_app.create_app(args.model, device=args.device,
                                   **{k: v for k, v in options.items() if v is not None})
    except (ValueError, LookupError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"distillsr serve: http://{args.host}:{args.port}/ (API: POST /v1/upscale)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
