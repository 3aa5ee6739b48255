"""Serving loopfit models with vLLM: `vllm serve FOLDER` and `vllm.LLM(FOLDER)` once loopfit is installed.

`loopfit.serve.plugin.register` is vLLM's `vllm.general_plugins` entry point (see pyproject.toml); the model
itself is `loopfit.serve.vllm.LoopfitForCausalLM`.
"""
