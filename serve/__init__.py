"""ACE-Step 1.5 on Ray Serve: the only package here that imports Ray (the library ``acestep`` does not).

Build and run::

    acestep serve --demo                       # local Ray + the app, tiny demo checkpoints
    acestep serve --checkpoints ./checkpoints  # real checkpoints
    serve run serve_config.yaml                # the same app from its config file

Python handle calls (inside the cluster, or a driver connected to it)::

    from ray import serve
    from acestep.inference import GenerationParams, GenerationConfig

    app = serve.get_app_handle("acestep")                      # the Ingress
    result = app.generate.remote(GenerationParams(caption="lofi piano", duration=30),
                                 GenerationConfig(batch_size=1, audio_format="flac")).result()
    result.audios[0]["tensor"]      # [2, samples] float32, as from acestep.inference.generate_music
    result.audios[0]["url"]         # /v1/audio/<key>.flac on the HTTP port

    lm = serve.get_deployment_handle("LMDeployment", app_name="acestep")
    lm.stats.remote().result()      # batch sizes this LM replica has seen

Modules: ``config`` (AppConfig, the ``args`` of serve_config.yaml), ``app`` (``build_app``), ``deployments``
(LMDeployment, DiTDeployment, TaskStore; cross-request LM batching is the library's
``acestep.inference.plan_music_batch``), ``api`` (FastAPI
ingress), ``schemas`` (HTTP models), ``compat`` (the official /release_task, /query_result), ``tasks``
(task store and progress events), ``cli`` (``acestep serve``).
"""
