"""``acestep serve``: start a local Ray (in-process) and the Serve app from ``serve_config.yaml``.

Wired into ``acestep/cli.py`` by ``add_serve_parser(subparsers)``; ``run_serve(args)`` is the handler.
Everything the app does is configuration: this command only picks the config file and overrides the
checkpoint source and the HTTP address.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "serve_config.yaml"


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="run the Ray Serve app (HTTP API, OpenAPI at /docs)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoints", metavar="DIR", help="checkpoints root (DiT, vae/, text encoder, LM)")
    source.add_argument("--demo", action="store_true", help="use tiny random demo checkpoints (written to a cache)")
    parser.add_argument("--config", type=Path, default=None, help=f"Serve config file (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("--host", default=None, help="HTTP host (default: from the config, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: from the config, 8000)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    parser.add_argument("--num-gpus", type=int, default=None, help="GPUs for the local Ray (default: detected)")
    parser.set_defaults(func=run_serve)
    return parser


FALLBACK_CONFIG = {  # when installed without the repo's serve_config.yaml: AppConfig defaults
    "http_options": {"host": "127.0.0.1", "port": 8000},
    "applications": [{"name": "acestep", "route_prefix": "/", "import_path": "serve.app:build_app", "args": {}}],
}


def load_serve_config(path: Optional[Path] = None) -> Dict[str, Any]:
    if path is None and not DEFAULT_CONFIG.exists():
        return copy.deepcopy(FALLBACK_CONFIG)
    with open(Path(path or DEFAULT_CONFIG)) as handle:
        return yaml.safe_load(handle)


def apply_overrides(serve_config: Dict[str, Any], checkpoints: Optional[str] = None, demo: bool = False,
                    host: Optional[str] = None, port: Optional[int] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(http_options, application entry) with the command line's overrides applied."""
    serve_config = copy.deepcopy(serve_config)
    http = dict(serve_config.get("http_options") or {})
    if host:
        http["host"] = host
    if port:
        http["port"] = port
    app = serve_config["applications"][0]
    args = app.setdefault("args", {})
    if checkpoints:
        args["checkpoints"], args["demo"] = str(Path(checkpoints).expanduser().resolve()), False
    elif demo:
        args["demo"] = True
    return http, app


def run_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from serve.app import build_app
    from serve.config import AppConfig

    http, app = apply_overrides(load_serve_config(args.config), args.checkpoints, args.demo,
                                 getattr(args, "host", None), getattr(args, "port", None))
    config = AppConfig.model_validate(app.get("args") or {})
    if config.demo:  # write the demo set before any replica starts (each would otherwise race to do it)
        print(f"demo checkpoints: {config.checkpoint_root()}", flush=True)
    try:  # a missing model folder: one line now, not a traceback from a replica later
        config.check_model_folders()
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # Ray workers inherit the environment: make this checkout importable by the replicas.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=getattr(args, "num_cpus", None), num_gpus=getattr(args, "num_gpus", None),
             include_dashboard=False)
    serve.start(http_options={"host": http.get("host", "127.0.0.1"), "port": http.get("port", 8000)})
    serve.run(build_app(config), name=app.get("name", "acestep"), route_prefix=app.get("route_prefix", "/"))
    url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    print(f"acestep serve: ready at {url} (OpenAPI at {url}/docs); Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        ray.shutdown()
    return 0


def main(argv=None) -> int:
    """Standalone entry (``python -m serve.cli``) until ``acestep/cli.py`` wires the subcommand."""
    parser = argparse.ArgumentParser(prog="acestep")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
