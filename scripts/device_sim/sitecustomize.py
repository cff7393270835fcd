"""Makes this interpreter look like the GPU machine's for a dry run of ``scripts/gpu-check.sh``.

That machine has torch, transformers, safetensors, numpy, scipy, pyyaml and pytest, but none of the
packages below, and no network. Here they are importable only from the folder the carried wheels were
installed into (``ACESTEP_DEVICE_SITE``), so a dry run fails where the device run would: a wheel
missing from ``scripts/gpu-wheels.sh``, or a GPU test or benchmark that needs Ray.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys

# Top-level module names absent on the device image (the serving stack and the library's extras).
DEVICE_LACKS = frozenset({
    "ray", "vllm", "fastapi", "starlette", "uvicorn", "redis", "pydantic", "pydantic_core", "playwright",
    "schemathesis", "moto", "limits", "multipart", "python_multipart",
    "diffusers", "soundfile", "_soundfile", "_soundfile_data", "cffi", "_cffi_backend", "pycparser",
    "importlib_metadata", "peft", "pywt", "torchao",
})


class DeviceImage:
    """A meta-path finder: the names above resolve only inside the carried-wheels folder."""

    def __init__(self, site: str):
        self.site = [site] if site else []

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top not in DEVICE_LACKS or "." in fullname:
            return None  # submodules follow their parent's __path__, which already points at site
        spec = importlib.machinery.PathFinder.find_spec(fullname, self.site)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {fullname!r} (not on the GPU machine, not carried)",
                                      name=fullname)
        return spec


sys.meta_path.insert(0, DeviceImage(os.environ.get("ACESTEP_DEVICE_SITE", "")))
