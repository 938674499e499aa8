"""`dforge serve`: a local web page to explore diffusion and the runs given (see docs/web.md)."""
from __future__ import annotations

from . import HelpFormatter, UserError

DEFAULT_HOST, DEFAULT_PORT, DEFAULT_QUEUE = "127.0.0.1", 7860, 32     # as web.ports
EXAMPLES = """examples:
  dforge serve                                  the page at http://127.0.0.1:7860/ (runs under ./runs offered)
  dforge serve runs/mnist runs/digits           these runs in Generate, Compare and Runs
  dforge serve runs/ --port 8000                every run folder under runs/, on port 8000
  dforge serve runs/mnist --host 0.0.0.0        reachable from other machines (no login: trusted networks only)
Tabs: Schedules, Forward process, Generate (step by step, cancellable), Compare (two samplers, same seeds),
Runs (loss curve, sample grids, metrics.jsonl). Every picture has a download button. Ctrl-C stops the server.
"""


def register(sub) -> None:
    p = sub.add_parser("serve", help="a local web page: schedules, the forward process, generation, runs",
                       description="Serve a web page (Gradio) that shows the noise schedules, data turning into "
                                   "noise, a model generating step by step (x_t and its x_0 prediction), two "
                                   "samplers from the same seeds, and each run's loss, sample grids and metrics. "
                                   "Requests wait in one queue (at most --max-queue); generations run one at a "
                                   "time.",
                       formatter_class=HelpFormatter, epilog=EXAMPLES)
    p.add_argument("runs", nargs="*", metavar="RUN",
                   help="run folders of `dforge train` (or diffusers folders), or folders holding them "
                        "(default: ./runs and ./outputs when they exist); any other path can be typed on the page")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help="address to listen on: 127.0.0.1 serves this machine only; 0.0.0.0 every network")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0: any free port)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_QUEUE,
                   help="requests that may wait in the queue; beyond it the page says the queue is full")
    p.add_argument("--device", default="cpu", help="device the models run on: cpu, auto, cuda, cuda:N or mps")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    if args.max_queue < 1:
        raise UserError(f"--max-queue must be >= 1, got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must lie in [0, 65535], got {args.port}")
    missing = [r for r in args.runs if not Path(r).exists()]
    if missing:
        raise UserError(f"{missing[0]}: no such run folder (give folders written by `dforge train`)")
    runs = args.runs or [d for d in ("runs", "outputs") if Path(d).is_dir()]
    from ..web.ports import check_port

    if args.port:
        check_port(args.host, args.port)               # before importing Gradio: a clear line when taken
    from ..device import resolve_device

    try:
        from ..web.app import build_app, launch
    except ImportError as e:
        raise UserError(f"dforge serve needs Gradio ({e}): pip install 'diffusion_forge[web]'") from None

    app = build_app(runs, device=str(resolve_device(args.device)), max_queue=args.max_queue)
    found = len(app.dforge_models)
    print(f"dforge serve: {found} model folder{'s' * (found != 1)} offered; queue: at most {args.max_queue} waiting "
          f"requests, one generation at a time; Ctrl-C stops")
    launch(app, args.host, args.port, block=True)
    return 0
