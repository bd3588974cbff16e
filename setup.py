"""Jedusa: Medusa speculative decoding in PyTorch, hybrid PyTorch+Jittor, and Jittor."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="jedusa",
    version="0.1.0",
    description="Medusa LLM inference acceleration with PyTorch and Jittor backends",
    long_description=Path(__file__).with_name("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["medusa*", "medusa_jittor*", "medusa_jittor_all*", "my_judge*"]),
    include_package_data=True,
    package_data={"medusa": ["shipped/**/*"], "my_judge": ["data/*.json"]},
    install_requires=[line for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
                      if line and not line.startswith("#")],
)
