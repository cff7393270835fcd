"""``build_app(args) -> Application``: the one way the Serve app is built.

``serve_config.yaml`` names it as ``import_path: serve.app:build_app`` with ``args`` validated by
``serve.config.AppConfig``; ``acestep serve`` and the tests call it with the same args.
"""

from __future__ import annotations

from typing import Any, Dict, Union

from ray.serve import Application

from serve.api import Ingress
from serve.config import AppConfig
from serve.deployments import DiTDeployment, LMDeployment


def build_app(args: Union[Dict[str, Any], AppConfig, None] = None) -> Application:
    """Bind the LM, the DiT and the ingress, each with its own Serve options from the config (task
    records and audio live in the stores the config names, outside every replica)."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    lm = LMDeployment.options(**config.lm.deployment.to_serve()).bind(config)
    dit = DiTDeployment.options(**config.dit.deployment.to_serve()).bind(config)
    return Ingress.options(**config.ingress.deployment.to_serve()).bind(config, lm, dit)
