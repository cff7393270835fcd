"""The DiT half: conditioning, task contexts, schedules, samplers, guidance, VAE. No LM imports."""
