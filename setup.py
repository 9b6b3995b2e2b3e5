from setuptools import find_packages, setup

setup(
    name="medgpt-ds",
    version="0.1.0",
    description="DeepSpeed-centric trainer for the MedicalGPT pipeline (pt, sft, rm, ppo, dpo, orpo, grpo)",
    packages=find_packages(include=["medgpt_ds", "medgpt_ds.*"]),
    package_data={"medgpt_ds": ["presets/*.json"]},
    python_requires=">=3.10",
    # torch is deliberately not pinned to a CUDA build: install the torch you want first
    # (the Makefile installs torch==2.13.0 CPU), then this package.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.50",
        "peft>=0.14",
        "datasets>=3.0",
        "trl>=1.0",
        "sentencepiece",
        "tokenizers",
        "tensorboard",
        "safetensors",
        "pyyaml",
        "tqdm",
        "numpy",
    ],
    extras_require={
        "gpu": ["flash-attn", "bitsandbytes"],
        "qlora": ["bitsandbytes"],
        "serve": ["fastapi", "uvicorn", "gradio", "openai", "httpx", "matplotlib"],
        "test": ["pytest", "ruff"],
    },
)
