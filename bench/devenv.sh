# Source on the device machine (no pip, no internet): makes `import liveact` work from this checkout.
#   source bench/devenv.sh
_root=$(pwd)
rm -rf /tmp/liveact_path && mkdir -p /tmp/liveact_path/liveact
cp "$_root/liveact_pkg/__init__.py" /tmp/liveact_path/liveact/__init__.py
for _d in kernels model runtime bench tools; do ln -s "$_root/$_d" /tmp/liveact_path/liveact/$_d; done
export PYTHONPATH=/tmp/liveact_path${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
