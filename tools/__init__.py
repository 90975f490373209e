"""liveact.tools"""
