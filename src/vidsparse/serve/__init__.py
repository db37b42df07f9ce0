"""HTTP server: ``vidsparse serve`` (FastAPI). See ``app.create_app``."""
