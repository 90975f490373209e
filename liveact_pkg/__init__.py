"""liveact-engine: real-time LiveAct inference (kernels, model, runtime, bench, tools)."""
