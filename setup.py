"""zsjax: ZeroSearch-style RL (an LLM learns to search; another LLM simulates the engine) in JAX."""

from setuptools import find_packages, setup

setup(
    name="zsjax",
    version="0.1.0",
    description="ZeroSearch in JAX: RL for search-using LLMs with a simulated search engine.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["zsjax", "zsjax.*"]),
    python_requires=">=3.10",
    # Ranges are the ones tested here; the upper bounds keep a fresh install on
    # the APIs this code was written against.
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "transformers>=5.23,<6",
        "datasets>=5.2,<6",
        "ml-collections>=1.1,<2",
        "tensorboard>=2.21,<3",
        "safetensors>=0.8,<1",
        "tokenizers>=0.23,<1",
        "absl-py>=2.5",
        "numpy>=2.0",
        "ml-dtypes>=0.6",
        "tqdm>=4.70",
        "matplotlib>=3.9",
        "bm25s>=0.3.16,<0.4",
    ],
    extras_require={
        # torch only for logit-parity tests against transformers' PyTorch models;
        # 2.13.0 is the CPU build available offline on the project machines.
        "test": ["pytest>=9", "pytest-xdist>=3.8", "chex>=0.1.92", "torch==2.13.0"],
        # accelerators: JAX's own extras, pinned to the jax above (jax 0.10.2's metadata:
        # cuda12 pulls jax-cuda12-plugin[with-cuda] 0.10.2 and NVIDIA's CUDA 12 / cuDNN
        # wheels; tpu pulls libtpu 0.0.42.*). "cuda12-local" uses a CUDA already installed.
        "cuda12": ["jax[cuda12]>=0.10.2,<0.11"],
        "cuda12-local": ["jax[cuda12-local]>=0.10.2,<0.11"],
        "cuda13": ["jax[cuda13]>=0.10.2,<0.11"],
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    },
)
