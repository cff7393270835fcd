"""``--via-serve`` against the real Serve app (serve.app:build_app on the demo checkpoints), its audio
store on a real S3-compatible server (moto's, session fixture ``s3``): the DiT replicas write the
files there, the ingress reads them back for the job.

Starting the app costs ~40 s on 2 CPUs; it runs by default (ACESTEP_FAST_TESTS=1 skips it), beside
the quicker test in test_render.py that uses a tiny in-test deployment with the same ``generate``."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import soundfile as sf

pytestmark = pytest.mark.skipif(os.environ.get("ACESTEP_FAST_TESTS") == "1", reason="ACESTEP_FAST_TESTS=1")


def test_rows_render_through_the_real_app(demo_root, tmp_path, s3):
    import ray
    from ray import serve

    from pipelines.manifest import read_manifest
    from pipelines.render import main
    from serve.app import build_app
    from serve.cli import apply_overrides, load_serve_config

    _, app = apply_overrides(load_serve_config(), checkpoints=str(demo_root), host="127.0.0.1", port=0)
    app["args"]["state_dir"] = str(tmp_path / "state")
    bucket = s3.bucket()
    app["args"]["store"] = {**app["args"].get("store", {}), "audio_url": f"s3://{bucket}/audio",
                            "audio_options": s3.options}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        serve.run(build_app(app["args"]), name="acestep", route_prefix=None)
        rows = [{"id": "lm", "caption": "lofi", "duration": 10, "seed": 3, "thinking": True},
                {"id": "two", "caption": "jazz", "duration": 10, "seed": 4, "batch_size": 2},
                {"id": "bad", "caption": "x", "duration": 10, "inference_steps": 20}]  # > turbo's 8
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert main(["--input", str(prompts), "--output", str(tmp_path / "out"), "--via-serve", "acestep"]) == 1
    finally:
        ray.shutdown()
    records = {r["id"]: r for r in read_manifest(tmp_path / "out")}
    assert records["lm"]["error"] is None and records["lm"]["codes"][0].startswith("<|audio_code_")
    assert isinstance(records["lm"]["lm_metadata"].get("bpm"), int)
    assert records["two"]["seeds"] == [4, 5] and len(records["two"]["files"]) == 2
    assert records["two"]["preset"]["preset"] == "turbo" and records["two"]["preset"]["filled"]["shift"] == 3.0
    assert "inference_steps" in records["bad"]["error"] and "acestep-v15-turbo" in records["bad"]["error"]
    objects = s3.client().list_objects_v2(Bucket=bucket, Prefix="audio/")["Contents"]
    stored = {hashlib.sha256(s3.read(bucket, o["Key"])).digest() for o in objects if o["Key"].endswith(".flac")}
    assert len(stored) == 3 and not (tmp_path / "state" / "audio").exists()
    for record in (records["lm"], records["two"]):
        for name in record["files"]:
            assert sf.read(tmp_path / "out" / name)[0].shape == (480000, 2)
            # the app's stored file, byte for byte: encoded once, never decoded and encoded again
            assert hashlib.sha256((tmp_path / "out" / name).read_bytes()).digest() in stored
    assert "inference_steps" in records["bad"]["error"] and not records["bad"]["files"]
