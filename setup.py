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
    # Floors are the versions CI tests (requirements.txt; tests/test_packaging.py keeps them equal):
    # transformers 5 stores MoE experts as stacked weights and loads composite checkpoints
    # differently from 4.x, peft's target_parameters and its transformers-5 conversions moved in
    # every release; nothing older is tested, so nothing older is allowed.
    install_requires=[
        "torch>=2.13",
        "deepspeed>=0.19.8",
        "transformers>=5.23",
        "peft>=0.21.2",
        "datasets>=5.2",
        "trl>=1.16",
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
        # --report_to trackers (medgpt_ds/report/); tensorboard is always installed
        "wandb": ["wandb"],
        "swanlab": ["swanlab"],
        "mlflow": ["mlflow-skinny"],
        "trackers": ["wandb", "swanlab", "mlflow-skinny"],
        "test": ["pytest", "ruff"],
    },
)
