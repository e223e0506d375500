"""One distribution: the engine-free core, both engine plugins and the Triton kernels.

No engine is an install requirement: vLLM (CPU or CUDA build) and SGLang pin clashing torch
versions, so `scripts/setup.sh` installs each into its own virtualenv and installs this package
beside it. The `test` extra is what the test command needs.
"""

from setuptools import setup

setup(
    name="cognica-serve",
    version="0.1.0",
    description="vLLM and SGLang plugins for Cognica-BP/PoE-v1.0-1.3B-base (nanochat architecture)",
    python_requires=">=3.10",
    packages=["cognica", "cognica_vllm", "cognica_sglang", "cognica_sglang.cpu_stub", "cognica_kernels"],
    package_dir={"cognica_kernels": "kernels/cognica_kernels"},
    # the CPU stand-in for sgl_kernel is data under cognica_sglang.cpu_stub, never a top-level package
    package_data={"cognica": ["chat_template.jinja"], "cognica_sglang.cpu_stub": ["sgl_kernel/*.py"]},
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "tiktoken>=0.7",
        "tokenizers>=0.19",
        "transformers>=4.45",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "ruff", "requests"],
    },
    entry_points={
        "console_scripts": ["cognica=cognica.cli:main"],
        "vllm.general_plugins": ["cognica=cognica_vllm:register"],
        "sglang.srt.plugins": ["cognica=cognica_sglang:register"],
        # `cognica bpb --engine NAME`: each plugin offers its prompt log-prob back end (the core imports no plugin)
        "cognica.bpb_backends": ["vllm=cognica_vllm.bpb:prompt_logprobs", "sglang=cognica_sglang.bpb:prompt_logprobs"],
        # `cognica sglang-cpu-path`: the folder with SGLang's CPU stand-in for sgl_kernel
        "cognica.paths": ["sglang-cpu=cognica_sglang.cpu_stub:stub_path"],
    },
)
