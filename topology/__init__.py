"""Pure model: config, roles, pipeline, flow computation. No I/O."""
