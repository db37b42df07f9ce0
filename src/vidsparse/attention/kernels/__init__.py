"""Private Triton kernels. Import only through ``vidsparse.attention.ops``; nothing here runs at import time."""
