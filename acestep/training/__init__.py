"""LoRA / LoKr training of the DiT (no Ray here; ``pipelines.train_lora`` runs it on Ray Train and
``pipelines.prepare_dataset`` prepares its data with Ray Data).

- ``samples``: the prepared-sample format (one safetensors file per song) and the dataset manifest;
- ``labels``: a song's text (sidecar fields), upstream's tag, genre and auto-label rules (no torch:
  the server's dataset routes use it);
- ``prepare``: one song → a prepared sample (VAE latents, condition states, context), auto-labels;
- ``objective``: the official flow-matching loss, timestep sampling and CFG dropout;
- ``lora``: peft LoRA / LoKr on the DiT, saved in the official PEFT layout;
- ``loop``: ``TrainConfig`` and ``Trainer`` (deterministic batches, gradients averaged over workers);
- ``run``: a run in one process (load, train, checkpoint, save)."""
