"""liveact.runtime"""
