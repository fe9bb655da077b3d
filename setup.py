from setuptools import find_packages, setup

# The web demo, app.py (`pip install -e ".[app]"`): Gradio 6 needs Python >= 3.10, so on 3.9 the extra installs only
# matplotlib and the app's tests skip; the package itself keeps Python 3.9. requirements.txt (what a Hub Space
# installs) is install_requires plus these, in this order (tests/test_app.py checks it).
APP_REQUIRES = ['gradio>=6.0,<7; python_version >= "3.10"', "matplotlib"]

setup(
    name="dinof-diffusers",
    version="0.1.0",
    description="DiNof: diffusion models with deterministic normalizing flow priors, for Hugging Face diffusers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["dinof_diffusers", "dinof_diffusers.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "diffusers>=0.30",
        "transformers>=4.40",
        "accelerate>=0.30",
        "datasets>=2.18",
        "huggingface_hub>=0.23",
        "safetensors>=0.4",
        "pyyaml",
        "tensorboard",
        "torch-fidelity>=0.3",
        "scikit-learn>=1.2",
        "numpy",
        "Pillow",
        "tqdm",
    ],
    extras_require={
        "app": APP_REQUIRES,
        # scipy: the tests check the rk45 solver against scipy.integrate.solve_ivp (the published code's solver);
        # gradio_client: the app's tests call the served page through it
        "test": ["pytest>=7", "normflows==1.7.3", "scipy", 'gradio_client; python_version >= "3.10"', *APP_REQUIRES],
        "dev": [
            "pytest>=7",
            "normflows==1.7.3",
            "scipy",
            'gradio_client; python_version >= "3.10"',
            *APP_REQUIRES,
            "ruff",
        ],
    },
    entry_points={
        "console_scripts": [
            "dinof-convert-flow=dinof_diffusers.conversion.flow:main",
            "dinof-convert-checkpoint=dinof_diffusers.conversion.checkpoint:main",
        ],
    },
)
