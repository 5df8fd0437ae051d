def require_cuda():
    pass
