"""liveact.bench"""
