"""LM engines behind one call: ``generate(requests: list[LMRequest]) -> list[list[int]]``
(generated token ids per request, stop token included). ``pt`` runs transformers in-process;
``vllm`` (optional extra, CUDA only) runs vLLM's AsyncLLM."""
