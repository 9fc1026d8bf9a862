"""apf-emu benchmarks: `apf-emu bench` runs bench/run.py; see bench/README.md."""
