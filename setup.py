from setuptools import setup

PKGS = ["kernels", "model", "runtime", "bench", "tools"]

setup(
    name="liveact-engine",
    version="0.1.0",
    description="Real-time audio-driven human animation: a Triton inference engine for SoulX-LiveAct",
    packages=["liveact"] + [f"liveact.{p}" for p in PKGS],
    package_dir={"liveact": "liveact_pkg", **{f"liveact.{p}": p for p in PKGS}},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4", "triton==3.6.0", "numpy<2.3", "safetensors", "transformers", "soundfile", "av",
        "pillow", "tqdm", "nvidia-ml-py",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark"], "baselines": ["sageattention==1.0.6"]},
    entry_points={"console_scripts": ["liveact=liveact.tools.cli:main"]},
)
