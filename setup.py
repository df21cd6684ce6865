"""tepo_jax: TEPO / GRPO / ResT reinforcement learning for tool-using LLM agents in JAX."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12",
    "numpy>=2.0",
    "ml_dtypes>=0.5",
    "transformers>=5.0",
    "safetensors>=0.5",
    "ml_collections>=1.0",
    "absl-py>=2.0",
    "grain>=0.2.12",
    "tensorflow-datasets>=4.9.8",
    "array_record>=0.7",
    "bm25s>=0.3",
    "fastapi>=0.110",
    "uvicorn>=0.30",
    "httpx>=0.27",
    "math-verify>=0.7",
    "jsonschema>=4.0",
    "tqdm>=4.60",
    "matplotlib>=3.8",
    "tensorboardX>=2.6",
]

EXTRAS = {
    # torch (CPU build) is only the reference implementation the parity tests compare against.
    # tiktoken: transformers' TikTokenConverter builds the Qwen2.5 / Llama-3 tokenizers in the tests.
    "test": ["pytest>=8", "pytest-timeout", "torch", "quicktok-v1", "tiktoken", "nbclient", "nbformat",
             "ipykernel", "gcsfs", "gcp-storage-emulator", "wandb"],
    # gcsfs: gs:// workdirs (pods share no disk; tepo_jax/paths.py); wandb: config.log.wandb_project
    "tpu": ["jax[tpu]>=0.10", "gcsfs>=2024.2"],
    "gcs": ["gcsfs>=2024.2"],
    "wandb": ["wandb>=0.17"],
    "gpu": ["jax[cuda12]>=0.10"],
}

setup(
    name="tepo_jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["tepo_jax", "tepo_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["tepo_jax=tepo_jax.cli:main"]},
)
