# The training image: `cnnloop train`, `retrain`, `export`, torchrun. Build from the repo root:
#   docker build -f k8s/images/train.Dockerfile -t ghcr.io/cnnloop/cnnloop-train:0.1.0 .
#   docker build -f k8s/images/train.Dockerfile --build-arg VARIANT=gpu \
#     -t ghcr.io/cnnloop/cnnloop-train:0.1.0-gpu .
# VARIANT picks the pyproject extra: cpu (onnxruntime) or gpu (onnxruntime-gpu), never both.
# TORCH_INDEX_URL: the cpu build takes torch's CPU-only wheel (about 2 GB less than PyPI's CUDA
# build); the gpu build leaves it empty and gets PyPI's CUDA wheels, which bring their own CUDA
# libraries (the node provides only the driver).
FROM python:3.11-slim AS build
ARG VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN case "$VARIANT" in cpu|gpu) ;; *) echo "VARIANT must be cpu or gpu, got '$VARIANT'" >&2; exit 2;; esac
WORKDIR /src
COPY pyproject.toml README.md ./
COPY training ./training
COPY exporters ./exporters
COPY service ./service
RUN if [ "$VARIANT" = gpu ] && [ "$TORCH_INDEX_URL" = https://download.pytorch.org/whl/cpu ]; then TORCH_INDEX_URL=; fi; \
    python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".[$VARIANT]" \
 && /opt/venv/bin/cnnloop --help >/dev/null

FROM python:3.11-slim
# A fixed non-root uid/gid: the k8s manifests run these pods as 10001 (runAsNonRoot).
RUN groupadd --gid 10001 cnnloop && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin cnnloop
COPY --from=build /opt/venv /opt/venv
# The pods run with a read-only root filesystem and a writable /tmp: every cache goes there.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/torch \
    MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /work
USER 10001:10001
CMD ["cnnloop", "--help"]
