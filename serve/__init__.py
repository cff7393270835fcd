"""ACE-Step 1.5 on Ray Serve. The library ``acestep`` imports no Ray; this package and ``pipelines``
(Ray Data) do.

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
    result.audios[0]["bytes"]       # the stored file (flac), as GET /v1/audio/<key>.flac serves it
    result.audios[0]["tensor"]      # [2, samples] float32, as from acestep.inference.generate_music
                                    # (include_tensors=False skips decoding it)

    lm = serve.get_deployment_handle("LMDeployment", app_name="acestep")
    lm.stats.remote().result()      # rows, steps and requests of this LM replica's engine

Rooms: ARCHITECTURE.md lists them (``api`` the ingress, ``submission`` and ``pipeline`` the task
path, ``store/`` the task and audio stores, ``edge/`` the input defences, ``compat/`` the official
dialects, ``deployments`` the LM and DiT replicas, ``cli`` ``acestep serve``).
"""
