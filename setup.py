from setuptools import setup

setup(
    name="patfast",
    version="0.1.0",
    description="Fast heterogeneous knowledge distillation with PAT (Perspective-Aware Teaching)",
    python_requires=">=3.10",
    # kernels/ is installed as patfast.kernels; there is no top-level "kernels" package.
    packages=["patfast", "patfast.models", "patfast.distill", "patfast.data", "patfast.train",
              "patfast.bench", "patfast.kernels"],
    package_dir={"patfast": "patfast", "patfast.kernels": "kernels"},
    package_data={"patfast": ["recipes/*.yaml", "bench/step_layouts.json"]},
    install_requires=[
        "torch>=2.5",  # torch.serialization.safe_globals (timm 0.6.5 teacher files)
        "timm>=1.0.9",
        "numpy",
        "scikit-learn",
        "pyyaml",
        "safetensors",
        "matplotlib",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark", "pytest-timeout", "pytest-xdist", "ruff"],
        "dali": ["nvidia-dali-cuda130"],
    },
    entry_points={"console_scripts": ["patfast = patfast.cli:main"]},
)
