"""apf-emu's launcher and log tools: `apf-emu run`, `check`, `stats`."""
