"""The kgpu HTTP gateway: FastAPI application, auth, users, drive routes."""
