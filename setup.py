from setuptools import find_packages, setup

setup(
    name="psyche",
    version="0.1.0",
    description="Psyche-R1 (SFT + GRPO for psychology exams) in plain PyTorch: Qwen2.5, FSDP2 SFT, GRPO, PCEB eval",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["psyche", "psyche.*"]),  # one top-level name: psyche
    package_data={"psyche": ["assets/base/*"]},  # the embedded default's base model (a few MB)
    install_requires=["torch>=2.4", "safetensors", "tokenizers>=0.19", "sentencepiece", "numpy", "click>=8",
                      "tqdm"],
    extras_require={
        "flash": ["flash-attn>=2.5"],
        "triton": ["triton>=3.0"],
        "eval": ["jieba", "rouge", "nltk"],
        "plot": ["matplotlib", "tensorboard"],
        "data": ["datasketch"],
        # the reference implementations are pinned in tests/references.txt (.ci/run installs with it)
        "test": ["pytest", "transformers", "peft", "jieba", "rouge", "nltk", "matplotlib", "tensorboard",
                 "datasketch"],
    },
    entry_points={"console_scripts": ["psyche=psyche.cli:main"]},
)
