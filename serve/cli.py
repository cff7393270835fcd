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
from typing import Any, Dict, List, Optional, Tuple, Union

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
    parser.add_argument("--api-key", default=None,
                        help="require this key as 'Authorization: Bearer <key>' (default: $ACESTEP_API_KEY)")
    parser.add_argument("--api-keys-file", default=None, help="file of 'name:key' lines (ingress.api_keys_file)")
    parser.add_argument("--insecure-no-auth", action="store_true",
                        help="allow a non-loopback --host without any key (anyone who reaches it may use it)")
    parser.add_argument("--state-dir", default=None,
                        help="task database and audio (default ~/.local/state/acestep); a restart resumes its queue")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    parser.add_argument("--num-gpus", type=int, default=None, help="GPUs for the local Ray (default: detected)")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="Prometheus port of Ray's metrics agent (default: a free port, printed at start)")
    parser.add_argument("--gpu-memory-gb", type=gpu_memory_arg, default=None, metavar="N|auto",
                        help="memory profile for a card of N GB ('auto': the first CUDA device's): its tier's "
                             "offload, quantization and request limits, where the config sets none (default: "
                             "no profile)")
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


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def auth_problem(host: str, has_keys: bool, insecure: bool) -> Optional[str]:
    """Why this address may not be served without a key, or None."""
    if has_keys or insecure or host in LOOPBACK_HOSTS or host.startswith("127."):
        return None
    return (f"--host {host} is reachable from other machines: give --api-key (or ACESTEP_API_KEY, or "
            f"ingress.api_keys_file), or --insecure-no-auth to serve it without keys")


def _app_args(args: argparse.Namespace) -> Tuple[Dict[str, Any], Dict[str, Any], List[str]]:
    """(http_options, application entry, the memory profile's lines to print)."""
    http, app = apply_overrides(load_serve_config(args.config), args.checkpoints, args.demo,
                                getattr(args, "host", None), getattr(args, "port", None))
    values = app.setdefault("args", {})
    if getattr(args, "state_dir", None):
        values["state_dir"] = str(Path(args.state_dir).expanduser().resolve())
    if getattr(args, "api_keys_file", None):
        values.setdefault("ingress", {})["api_keys_file"] = str(Path(args.api_keys_file).expanduser().resolve())
    profile = []
    requested = getattr(args, "gpu_memory_gb", None)
    if requested is not None:
        from serve.profile import memory_profile

        profile = memory_profile(values, requested, getattr(args, "num_gpus", None))
    return http, app, profile


def gpu_memory_arg(value: str) -> Union[str, float]:
    """``--gpu-memory-gb``: 'auto' or a positive number of GB."""
    if value == "auto":
        return value
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError("expected a number of GB above 0, or 'auto'")
    return number


def run_serve(args: argparse.Namespace) -> int:
    import signal

    import ray
    from ray import serve

    from serve.app import build_app
    from serve.config import AppConfig

    http, app, profile = _app_args(args)
    if profile:
        print("\n".join(profile), flush=True)
    logging_config = load_serve_config(args.config).get("logging_config")
    config = AppConfig.model_validate(app.get("args") or {})
    if getattr(args, "api_key", None):
        os.environ["ACESTEP_API_KEY"] = args.api_key  # replicas inherit it; it is never in a config or log
    has_keys = bool(os.environ.get("ACESTEP_API_KEY") or config.ingress.api_keys_file)
    problem = auth_problem(http.get("host", "127.0.0.1"), has_keys, getattr(args, "insecure_no_auth", False))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if config.demo:  # write the demo set before any replica starts (each would otherwise race to do it)
        print(f"demo checkpoints: {config.checkpoint_root()}", flush=True)
    try:  # a missing model folder: one line now, not a traceback from a replica later
        config.check_model_folders()
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # Ray workers inherit the environment: make this checkout importable by the replicas.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    # its own in-process Ray, even when another Ray runs on this machine
    ray.init(address="local", num_cpus=getattr(args, "num_cpus", None), num_gpus=getattr(args, "num_gpus", None),
             include_dashboard=False, _metrics_export_port=getattr(args, "metrics_port", None))
    # From here on SIGTERM stops cleanly, also while the models still load (after ray.init, whose
    # own handler would otherwise exit mid-start and abort the process).
    signal.signal(signal.SIGTERM, _interrupt)
    serving = False
    try:
        serve.start(http_options={"host": http.get("host", "127.0.0.1"), "port": http.get("port", 8000)},
                    logging_config=logging_config)
        serve.run(build_app(config), name=app.get("name", "acestep"), route_prefix=app.get("route_prefix", "/"),
                  logging_config=logging_config)
        serving = True
        _announce(http, ray)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the stop short
        if serving:
            print("stopping: draining tasks in flight", file=sys.stderr, flush=True)
            drain(app.get("name", "acestep"), config.ingress.drain_grace_s)
        else:
            print("stopping before the app was ready; queued tasks stay in the store for the next start",
                  file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print("stopped", file=sys.stderr, flush=True)
    return 0


def _announce(http: Dict[str, Any], ray) -> None:
    url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    print(f"acestep serve: ready at {url} (OpenAPI at {url}/docs); Ctrl-C to stop", flush=True)
    metrics_port = next((n["MetricsExportPort"] for n in ray.nodes() if n.get("Alive")), None)
    print(f"metrics: http://127.0.0.1:{metrics_port}/metrics (Prometheus); JSON logs: the Ray session's logs/serve/",
          flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def drain(app_name: str, grace_s: float) -> None:
    """Ask the ingress replicas to stop admitting and finish or release their tasks. Best effort: a
    replica this misses keeps its leases, which lapse, and the next start re-drives those tasks."""
    from ray import serve

    try:
        status = serve.status().applications[app_name].deployments["Ingress"]
        replicas = max(1, int((status.replica_states or {}).get("RUNNING", 1)))
        handle = serve.get_app_handle(app_name)
        calls = [handle.drain.remote(grace_s) for _ in range(2 * replicas)]
        for call in calls:
            print(f"drained: {call.result(timeout_s=grace_s + 30)}", file=sys.stderr, flush=True)
    except Exception as error:  # shutting down anyway; the store keeps every task
        print(f"drain incomplete ({type(error).__name__}); unfinished tasks resume on the next start",
              file=sys.stderr, flush=True)


def main(argv=None) -> int:
    """``python -m serve.cli serve ...``: the same subcommand as ``acestep serve``."""
    parser = argparse.ArgumentParser(prog="acestep")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
