"""ftrace text in and out: KVM's APF tracepoints as `trace-cmd report` prints them (docs/TRACING.md)."""
