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
from serve.models import deployment_name


def build_app(args: Union[Dict[str, Any], AppConfig, None] = None) -> Application:
    """Bind one deployment per served LM and DiT model and the ingress, each with its own Serve
    options from the config (task records and audio live in the stores the config names, outside
    every replica). The default models' deployments keep the plain names."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    lms = {name: LMDeployment.options(name=deployment_name("lm", name, config.lm.model),
                                      **config.lm.deployment.to_serve()).bind(config, name)
           for name in config.lm_models()}
    dits = {name: DiTDeployment.options(name=deployment_name("dit", name, config.dit.model),
                                        **config.dit.deployment.to_serve()).bind(config, name)
            for name in config.dit_models()}
    return Ingress.options(**config.ingress.deployment.to_serve()).bind(config, lms, dits)
