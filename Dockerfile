# The image every Kubeflow component runs in (components/common.py: IMAGE), also usable on its own:
#   docker build --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t ghcr.io/unet3plus/unet3plus:0.1.0 .
#   docker run --rm ghcr.io/unet3plus/unet3plus:0.1.0 synth --layout lits --out /tmp/raw
# torch 2.14.1 from PyPI is the CUDA 13 build on x86_64, so the same image trains on GPU nodes, and it
# ships torchrun (several GPUs per pod, Kubeflow Trainer TrainJobs across nodes). CUDA 13 needs an
# NVIDIA driver r580 or newer; for nodes with an older driver, build PyTorch's CUDA 12 wheels instead:
#   docker build --build-arg TORCH_CUDA=cu128 ...   (CUDA 12.8: any CUDA 12 driver, r525 or newer)
# GIT_COMMIT becomes the OCI label org.opencontainers.image.revision and UNET3PLUS_GIT_COMMIT, which
# every MLflow run and registered version written from the image records (it has no .git).
# Checked by hadolint with no warnings (tests/test_pipeline_kfp.py).
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg \
    DVC_NO_ANALYTICS=1

# git: MLflow and DVC record the commit when the code is a checkout (in the image: UNET3PLUS_GIT_COMMIT).
# Not version-pinned: Debian's stable git, with its security updates, is what we want here.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install --yes --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/unet3plus

# "" (default): torch from PyPI, CUDA 13. cu126 or cu128: the same pinned torch and torchvision,
# built for CUDA 12.6 / 12.8, from PyTorch's package index, before everything else.
ARG TORCH_CUDA=""
ENV UNET3PLUS_TORCH_CUDA=${TORCH_CUDA}

# Dependencies first, in their own layer (gigabytes of CUDA wheels), rebuilt only when the pins change:
# install the project's metadata with empty packages, then drop the project itself.
COPY pyproject.toml constraints.txt ./
RUN mkdir unet3plus components pipeline \
    && touch README.md unet3plus/__init__.py components/__init__.py pipeline/__init__.py \
    && if [ -n "${TORCH_CUDA}" ]; then \
         pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
           "$(grep '^torch==' constraints.txt)" "$(grep '^torchvision==' constraints.txt)"; \
       fi \
    && pip install -c constraints.txt . \
    && pip uninstall --yes unet3plus \
    && rm -rf unet3plus components pipeline build ./*.egg-info

COPY README.md ./
COPY unet3plus ./unet3plus
COPY components ./components
COPY pipeline ./pipeline
RUN pip install --no-deps -c constraints.txt . && rm -rf build ./*.egg-info

# Run as an unprivileged user. KFP's launcher writes artifacts under /gcs, /minio, /s3 and /oci in
# the container; create them writable by any user, as clusters may also pick an arbitrary uid.
RUN useradd --create-home --uid 1000 unet3plus \
    && install --directory --mode 1777 /gcs /minio /s3 /oci /work

# Last, so that a new commit rebuilds no layer above.
ARG GIT_COMMIT=""
LABEL org.opencontainers.image.title="unet3plus" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
ENV UNET3PLUS_GIT_COMMIT=${GIT_COMMIT}

USER 1000
WORKDIR /work

ENTRYPOINT ["unet3plus"]
CMD ["--help"]
