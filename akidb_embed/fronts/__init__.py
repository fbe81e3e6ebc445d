"""Network fronts of the supervisor: HTTP (REST + OpenAI-shaped) and gRPC.

Each front is its own process, a client of the supervisor through one ``AsyncClient``; it imports
no model runtime. ``common`` holds what both share: listen addresses, API keys, the mapping of
error codes to HTTP and gRPC statuses, and the model -> backend directory built from ``info``.
"""
