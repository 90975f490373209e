"""liveact.kernels"""
