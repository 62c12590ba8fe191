# Sourced by the GPU scripts (gpu_checks.sh, gpu_methods.sh) on a device machine without a package
# index: unpack the packages .devcarry/ carries (experiments/gpu_checks_prepare.sh), make rlrank
# importable (editable install, else the checkout with envs/agents symlinked), link ../shared to the
# carried data and checkpoints. Needs $L (a log folder) and a log() function.
if [ -f .devcarry/site312.tar.xz ]; then  # packages carried as files (gpu_checks_prepare.sh)
  mkdir -p /tmp/site && tar -xJf .devcarry/site312.tar.xz -C /tmp/site
  chmod -R a+x /tmp/site/ray/core  # Ray's gcs_server and raylet (archives of older prepare scripts lost the modes)
  export PYTHONPATH=/tmp/site
fi
if ! python3 -c "import rlrank.envs, rlrank.agents" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$L/install.log" 2>&1 \
    || log "editable install failed (see install.log)"
fi
if ! python3 -c "import rlrank.envs, rlrank.agents" 2>>"$L/install.log"; then  # no editable install
  ln -sfn ../envs rlrank/envs; ln -sfn ../agents rlrank/agents; export PYTHONPATH=$PWD:${PYTHONPATH:-}
  log "rlrank from the checkout (symlinked envs/agents)"
fi
[ -e ../shared ] || ln -s "$PWD/.devcarry/shared" ../shared
ls -la ../shared/ >>"$L/install.log" 2>&1
nvidia-smi >"$L/nvidia-smi.txt" 2>&1
